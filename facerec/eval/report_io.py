"""Writing report files: JSON that stays standard (NaN and inf become null, numpy values plain
numbers) and matplotlib when it is installed (an optional dependency: without it, plots are skipped).
Shared by the verify report (``facerec.eval.reports``), the quality report
(``facerec.eval.quality_report``) and ``facerec eval``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x))


def _clean(obj):
    """NaN/inf -> None so the JSON is standard."""
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    return obj


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(_clean(obj), indent=1, default=_json_default) + "\n")
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is an optional (dev) dependency
        return None
    return plt
