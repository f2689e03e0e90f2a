"""SCRFD (Guo et al., 2021) for user-provided insightface detector models, through onnxruntime.

We ship no SCRFD weights (insightface's model packs are for non-commercial research use); a user
points ``model_dir`` at a folder holding ``det_*.onnx`` (for example ``det_10g.onnx`` from
buffalo_l) or at the .onnx file itself.

What the models compute, and what this decoder assumes:
- input: RGB, (x - 127.5) / 128, NCHW; the image is resized keeping its aspect ratio into the
  top-left corner of a zero-filled square (640 by default or the model's fixed size);
- outputs: for each stride (8, 16, 32, or 8..128 for 5-stride models) in that order, first all
  the score maps, then all the box maps, then all the landmark maps; each has one row per
  (location, anchor) in row-major location order with the anchors innermost (2 anchors per
  location for 3-stride models, 1 for 5-stride ones); a leading batch axis of 1 may be present;
- anchor centres sit at (x * stride, y * stride) with no half-pixel offset; boxes are distances
  (left, top, right, bottom) and landmarks offsets (dx, dy) from the centre, in units of stride.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from facerec.data.detection import Detection, register_detector
from facerec.data.mtcnn import nms


def find_model(model_dir: str | Path) -> Path:
    """The detector ONNX file: ``model_dir`` itself if it is a file, else its ``det_*.onnx``."""
    p = Path(model_dir).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"SCRFD model folder or file not found: {p}")
    found = sorted(p.glob("det_*.onnx"))
    if not found:
        raise FileNotFoundError(
            f"no det_*.onnx in {p} (expected e.g. det_10g.onnx from insightface buffalo_l)"
        )
    return found[0]


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Resize keeping the aspect ratio into the top-left of a zero (w, h) canvas; returns the
    canvas and the scale (canvas pixels per image pixel)."""
    w, h = size
    ih, iw = image.shape[:2]
    scale = min(w / iw, h / ih)
    nw, nh = max(1, int(round(iw * scale))), max(1, int(round(ih * scale)))
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    canvas[:nh, :nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    # The scale actually applied along each axis differs by rounding; their mean is within
    # half a pixel of both over the image.
    return canvas, (nw / iw + nh / ih) / 2.0


def decode_outputs(
    outputs: list[np.ndarray],
    input_size: tuple[int, int],
    score_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Raw SCRFD outputs -> (boxes (N, 4), scores (N,), landmarks (N, 5, 2) or None) in input
    (letterboxed canvas) pixels, before NMS."""
    n = len(outputs)
    if n in (6, 9):
        strides, anchors = (8, 16, 32), 2
    elif n in (10, 15):
        strides, anchors = (8, 16, 32, 64, 128), 1
    else:
        raise ValueError(f"unexpected SCRFD model: {n} outputs (expected 6, 9, 10 or 15)")
    fmc = len(strides)
    has_kps = n == 3 * fmc
    w, h = input_size
    boxes, scores, kpss = [], [], []
    for i, s in enumerate(strides):
        sc = outputs[i].reshape(-1)
        bb = outputs[fmc + i].reshape(-1, 4) * s
        gw, gh = w // s, h // s
        if sc.shape[0] != gw * gh * anchors:
            raise ValueError(
                f"stride {s}: {sc.shape[0]} scores, expected {gw}x{gh}x{anchors} for input {w}x{h}"
            )
        gy, gx = np.mgrid[:gh, :gw]
        centres = np.stack([gx, gy], axis=-1).reshape(-1, 2).astype(np.float32) * s
        centres = np.repeat(centres, anchors, axis=0)  # anchors innermost
        ok = np.nonzero(sc >= score_threshold)[0]
        c = centres[ok]
        boxes.append(np.concatenate([c - bb[ok, 0:2], c + bb[ok, 2:4]], axis=1))
        scores.append(sc[ok])
        if has_kps:
            kp = outputs[2 * fmc + i].reshape(-1, 10)[ok] * s
            kpss.append(kp.reshape(-1, 5, 2) + c[:, None, :])
    return (
        np.concatenate(boxes).astype(np.float32),
        np.concatenate(scores).astype(np.float32),
        np.concatenate(kpss).astype(np.float32) if has_kps else None,
    )


class SCRFD:
    """``FaceDetector`` over an insightface SCRFD ONNX model."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        input_size: int | tuple[int, int] = 640,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        threads: int = 0,
    ):
        import onnxruntime as ort

        from facerec.data.mtcnn_onnx import _providers

        self.model_path = find_model(model_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.model_path), opts, providers=_providers(device))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        fixed = inp.shape[2:4]
        if all(isinstance(d, int) and d > 0 for d in fixed):  # a model exported at a fixed size
            self.input_size = (int(fixed[1]), int(fixed[0]))
        else:
            if isinstance(input_size, int):
                input_size = (input_size, input_size)
            self.input_size = tuple(input_size)
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        n_out = len(self.session.get_outputs())
        if n_out not in (9, 15):
            raise ValueError(
                f"{self.model_path.name}: {n_out} outputs; facerec needs an SCRFD model with "
                "landmarks (9 or 15 outputs)"
            )

    def detect(self, image: np.ndarray) -> list[Detection]:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
        canvas, scale = letterbox(image, self.input_size)
        x = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(x)})
        boxes, scores, kps = decode_outputs(outputs, self.input_size, self.score_threshold)
        keep = nms(boxes, scores, self.nms_threshold)
        return [
            Detection(box=boxes[i] / scale, score=float(scores[i]), landmarks=kps[i] / scale)
            for i in keep
        ]


@register_detector(name="scrfd")
def create_scrfd(device: str = "cpu", backend: str | None = None, model_dir=None, **kw) -> SCRFD:
    """An insightface SCRFD model (always onnxruntime, whatever ``backend`` says)."""
    if model_dir is None:
        raise ValueError(
            "scrfd needs model_dir: a folder with det_*.onnx (e.g. insightface buffalo_l) "
            "or the file; "
            "facerec does not ship SCRFD weights"
        )
    return SCRFD(model_dir, device=device, **kw)
