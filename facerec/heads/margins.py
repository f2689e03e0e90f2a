"""Margins as pure transforms of cosine logits: ``margin(cosine, labels) -> scaled logits``.

A margin changes only the target logit of each row (labels == -1 mark rows whose target class
is not in this logit block, e.g. another rank's Partial FC shard: they are only scaled). It owns
no class weights, so every margin works with every class-centre module (full FC, Partial FC).

Numerics, which the published code gets wrong (see shared/reference/methods.md):
- arccos of a cosine clamped to exactly +-1 has an infinite gradient, so we clamp inside
  (1 - eps) before arccos;
- where theta + m_i would pass pi, cos(theta + m_i) would start *increasing* in theta, so we use
  insightface's fallback cos(theta) - m_i * sin(m_i) with a per-sample threshold; the target
  logit then stays non-increasing over theta in [0, pi];
- the margin math runs in float32 even under autocast.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from facerec.registry import Registry
from facerec.rng import SeededRNG

_MARGINS: Registry[nn.Module] = Registry("margin")

register_margin = _MARGINS.register


COS_EPS = 1e-6


def create_margin(name: str, **kwargs) -> nn.Module:
    """Build a registered margin, e.g. ``create_margin("elastic_arcface_plus", s=64.0)``."""
    return _MARGINS.create(name, **kwargs)


def list_margins() -> list[str]:
    return _MARGINS.names()


def margin_is_elastic(name: str) -> bool:
    """Whether the registered margin ``name`` is an ElasticFace margin (draws its margins from its
    own seeded generator, so it takes the run's seed); an unknown name is refused."""
    return bool(_MARGINS.traits(name).get("elastic", False))


def arc_target_logit(cos_target: Tensor, margin: Tensor) -> Tensor:
    """cos(theta + m) with the numerics described in the module docstring (unscaled).

    ``cos_target`` and ``margin`` are float tensors of the same shape. theta + m is clamped at 0
    from below, so a negative sampled margin can never make the logit increase in theta.
    """
    cos_t = cos_target.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS)
    theta = torch.acos(cos_t)
    with_margin = torch.cos((theta + margin).clamp_min(0.0))
    fallback = cos_t - margin * torch.sin(margin)
    # theta + m <= pi  <=>  cos(theta) >= cos(pi - m) = -cos(m): a per-sample threshold.
    return torch.where(cos_t >= -torch.cos(margin), with_margin, fallback)


def cos_target_logit(cos_target: Tensor, margin: Tensor) -> Tensor:
    return cos_target - margin


class MarginHead(nn.Module):
    """Shared plumbing: pick the target logits, transform them, scale everything by ``s``.

    Subclasses define ``margins(cos_target, valid)`` (the per-row margin) and the target
    transform. ``target_cosine`` may be passed when the true target cosine of rows whose class
    lives on another shard is known (needed for rank-based margins under Partial FC).
    """

    target_transform: Callable[[Tensor, Tensor], Tensor]

    def __init__(self, s: float = 64.0, m: float = 0.5):
        super().__init__()
        if s <= 0:
            raise ValueError(f"scale s must be positive, got {s}")
        self.s = float(s)
        self.m = float(m)

    def margins(self, cos_target: Tensor, valid: Tensor) -> Tensor:
        return torch.full_like(cos_target, self.m)

    def forward(
        self, cosine: Tensor, labels: Tensor, target_cosine: Tensor | None = None
    ) -> Tensor:
        if cosine.dim() != 2 or labels.shape != cosine.shape[:1]:
            raise ValueError(
                f"expected cosine (N, C) and labels (N,), got {tuple(cosine.shape)} and "
                f"{tuple(labels.shape)}"
            )
        if cosine.dtype in (torch.float16, torch.bfloat16):
            cosine = cosine.float()
        labels = labels.long()
        local = labels >= 0
        rows = torch.arange(cosine.shape[0], device=cosine.device)
        safe_labels = labels.clamp_min(0)
        cos_target = cosine[rows, safe_labels]
        if target_cosine is None:
            target_cosine = cos_target.detach()
            valid = local
        else:
            target_cosine = target_cosine.detach().to(cosine.dtype)
            valid = torch.isfinite(target_cosine)
        m = self.margins(target_cosine, valid).to(cosine.dtype)
        new_target = type(self).target_transform(cos_target, m)
        # Rows without a local target write their own cosine back (a no-op), so no boolean
        # indexing (a host sync on GPU). Out-of-place index_put: one copy of the (N, C) block.
        new_target = torch.where(local, new_target, cos_target)
        logits = cosine.index_put((rows, safe_labels), new_target)
        return logits * self.s

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}"


class ArcFace(MarginHead):
    target_transform = staticmethod(arc_target_logit)


class CosFace(MarginHead):
    target_transform = staticmethod(cos_target_logit)


class _Elastic(MarginHead, SeededRNG):
    """ElasticFace (Boutros et al. 2022): a fresh margin per sample per step from N(m, sigma).

    plus=False: margins are assigned to rows at random (the draw order).
    plus=True ("ElasticFace+"): the drawn margins are sorted and assigned by rank, so the row with
        the smallest target cosine (farthest from its centre) gets the largest margin. The
        official code indexes with the sort permutation instead of its inverse, which leaves the
        ranks unrelated (Spearman ~ 0); ``official_plus_bug=True`` reproduces that for
        comparisons with the published numbers.

    Margins come from the module's own generator (seeded by ``seed``) and are drawn for every
    row, valid or not, so every rank of a data-parallel job draws the same margins for the same
    global rows. Its state travels in the state dict, so a resumed run draws what the
    uninterrupted run would have. In eval mode the margin is the mean ``m``.
    """

    def __init__(
        self,
        s: float = 64.0,
        m: float = 0.5,
        sigma: float = 0.05,
        plus: bool = False,
        seed: int = 0,
        official_plus_bug: bool = False,
    ):
        super().__init__(s=s, m=m)
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)
        self.plus = bool(plus)
        self.official_plus_bug = bool(official_plus_bug)
        self.init_rng(seed)

    def draw(self, n: int, device: torch.device) -> Tensor:
        """n margins from N(m, sigma) (float32)."""
        noise = torch.randn(n, generator=self.generator(device), device=device)
        return self.m + self.sigma * noise

    def margins(self, cos_target: Tensor, valid: Tensor) -> Tensor:
        if not self.training:
            return torch.full_like(cos_target, self.m)
        m = self.draw(cos_target.shape[0], cos_target.device)
        if not self.plus:
            return m
        # Rank only the valid rows; invalid rows keep their (unused) random draw.
        n_valid = valid.sum()
        key = torch.where(valid, cos_target, torch.full_like(cos_target, -math.inf))
        order = torch.argsort(key, descending=True)  # valid rows first, most similar first
        drawn_valid = torch.where(valid[order], m[order], torch.full_like(m, math.inf))
        m_sorted, _ = torch.sort(drawn_valid)  # ascending; the inf padding sorts last
        if self.official_plus_bug:
            # Published behaviour: margin_sorted[argsort] -- not rank-consistent.
            picked = m_sorted[order]
            return torch.where(valid & torch.isfinite(picked), picked, m)
        # order[k] is the row of rank k: it gets the k-th smallest margin (inverse permutation).
        # order is a permutation, so a scatter writes every row once (no boolean indexing).
        take = torch.arange(m.shape[0], device=m.device) < n_valid
        values = torch.where(take, m_sorted, m[order])
        return torch.empty_like(m).scatter_(0, order, values)

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, sigma={self.sigma}, plus={self.plus}"


class ElasticArcFace(_Elastic):
    target_transform = staticmethod(arc_target_logit)


class ElasticCosFace(_Elastic):
    target_transform = staticmethod(cos_target_logit)


# Defaults: the official ElasticFace config (s 64; m 0.5 Arc, 0.35 Cos; sigma 0.05, 0.0175 Arc+,
# 0.02 Cos+). All of them are overridable.


@register_margin
def arcface(s: float = 64.0, m: float = 0.5) -> nn.Module:
    return ArcFace(s=s, m=m)


@register_margin
def cosface(s: float = 64.0, m: float = 0.35) -> nn.Module:
    return CosFace(s=s, m=m)


@register_margin(elastic=True)
def elastic_arcface(s: float = 64.0, m: float = 0.5, sigma: float = 0.05, seed: int = 0):
    return ElasticArcFace(s=s, m=m, sigma=sigma, plus=False, seed=seed)


@register_margin(elastic=True)
def elastic_cosface(s: float = 64.0, m: float = 0.35, sigma: float = 0.05, seed: int = 0):
    return ElasticCosFace(s=s, m=m, sigma=sigma, plus=False, seed=seed)


@register_margin(elastic=True)
def elastic_arcface_plus(
    s: float = 64.0, m: float = 0.5, sigma: float = 0.0175, seed: int = 0,
    official_plus_bug: bool = False,
):
    return ElasticArcFace(s=s, m=m, sigma=sigma, plus=True, seed=seed,
                          official_plus_bug=official_plus_bug)


@register_margin(elastic=True)
def elastic_cosface_plus(
    s: float = 64.0, m: float = 0.35, sigma: float = 0.02, seed: int = 0,
    official_plus_bug: bool = False,
):
    return ElasticCosFace(s=s, m=m, sigma=sigma, plus=True, seed=seed,
                          official_plus_bug=official_plus_bug)
