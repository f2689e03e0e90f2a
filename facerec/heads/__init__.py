"""Class centres and margins (margins are pure transforms of cosine logits)."""

from facerec.heads.margins import (
    ArcFace,
    CosFace,
    ElasticArcFace,
    ElasticCosFace,
    create_margin,
    list_margins,
    margin_is_elastic,
    register_margin,
)
from facerec.heads.partial_fc import CentreOutput, PartialFC, shard_bounds

__all__ = [
    "ArcFace",
    "CentreOutput",
    "CosFace",
    "ElasticArcFace",
    "ElasticCosFace",
    "PartialFC",
    "create_margin",
    "list_margins",
    "margin_is_elastic",
    "register_margin",
    "shard_bounds",
]
