"""Any ONNX face-embedding model with insightface model-zoo conventions as a teacher.

Conventions (insightface ``ArcFaceONNX``): an aligned crop (ArcFace 5-point template) of the
graph's input size (112 x 112 for the zoo's recognition models), NCHW float32,
``(x - mean) / std`` with mean = std = 127.5, RGB (insightface decodes BGR with OpenCV and swaps to
RGB when it builds the blob). ``bgr=True`` feeds BGR instead; ``mean`` / ``std`` take one number or
three (per channel, in the order the model is fed). The input name and size are read from the
graph; the embedding is its first output unless ``output`` names another.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from facerec.teachers.base import AlignedInput, CropTeacher, hash_files_and_options, register_teacher


def _triple(value, what: str) -> tuple[float, float, float]:
    values = [float(value)] * 3 if np.isscalar(value) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"{what} must be one number or three, got {value!r}")
    return tuple(values)


class OnnxTeacher(CropTeacher):
    name = "onnx"
    input_kind = "aligned"

    def __init__(self, path: str | Path, bgr: bool = False, mean=127.5, std=127.5,
                 output: str | None = None, threads: int = 1, batch_size: int = 32,
                 providers: Sequence[str] = ("CPUExecutionProvider",), detector=None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"onnx teacher: {self.path} is not a file")
        self.bgr = bool(bgr)
        self.mean = np.array(_triple(mean, "mean"), np.float32).reshape(1, 3, 1, 1)
        self.std = np.array(_triple(std, "std"), np.float32).reshape(1, 3, 1, 1)
        if np.any(self.std == 0):
            raise ValueError("std must not be 0")
        self.batch_size = int(batch_size)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), opts, providers=list(providers))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
            raise ValueError(f"{self.path.name}: expected an NCHW input with 3 channels, got {shape}")
        h, w = shape[2], shape[3]
        size = h if isinstance(h, int) else 112  # a dynamic spatial size: the zoo's 112
        if isinstance(w, int) and w != size:
            raise ValueError(f"{self.path.name}: a square input is needed, got {h}x{w}")
        self.input_size = int(size)
        outputs = [o.name for o in self.session.get_outputs()]
        if output is not None and output not in outputs:
            raise ValueError(f"{self.path.name} has no output {output!r}; outputs: {outputs}")
        self.output = output or outputs[0]
        self.aligner = AlignedInput(self.input_size, detector)
        probe = self._run(np.zeros((1, self.input_size, self.input_size, 3), np.uint8))
        self.embedding_size = int(probe.shape[1])
        self.version = self.path.stem
        options = {"bgr": self.bgr, "mean": self.mean.ravel().tolist(), "std": self.std.ravel().tolist(),
                   "output": self.output, "input_size": self.input_size}
        self.weights_hash = hash_files_and_options([self.path], options)

    def _run(self, crops: np.ndarray) -> np.ndarray:
        x = crops.astype(np.float32).transpose(0, 3, 1, 2)
        if self.bgr:
            x = x[:, ::-1]
        x = np.ascontiguousarray((x - self.mean) / self.std, dtype=np.float32)
        out = self.session.run([self.output], {self.input_name: x})[0]
        return np.asarray(out, dtype=np.float32).reshape(len(crops), -1)

    def describe(self) -> dict:
        return {**super().describe(), "path": str(self.path), "bgr": self.bgr,
                "mean": self.mean.ravel().tolist(), "std": self.std.ravel().tolist(), "output": self.output}


@register_teacher
def onnx(path: str, **kwargs) -> OnnxTeacher:
    """An ONNX embedding model (insightface zoo conventions; options: bgr, mean, std, output)."""
    return OnnxTeacher(path, **kwargs)
