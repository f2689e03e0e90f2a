"""facerec: face recognition training, quality assessment, OOD detection and serving."""

__version__ = "0.1.0"
