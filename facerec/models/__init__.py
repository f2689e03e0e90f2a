"""Backbones for 112x112 aligned faces, behind one registry."""

from facerec.models.output import FaceOutput
from facerec.models.registry import create_model, list_models, register_model, trainable_models

# Importing the backbone modules registers their variants.
from facerec.models import iresnet as _iresnet  # noqa: E402,F401
from facerec.models import mobilefacenet as _mobilefacenet  # noqa: E402,F401
from facerec.models import vit as _vit  # noqa: E402,F401
from facerec.models import dlib_resnet as _dlib_resnet  # noqa: E402,F401

__all__ = ["FaceOutput", "create_model", "list_models", "register_model", "trainable_models"]
