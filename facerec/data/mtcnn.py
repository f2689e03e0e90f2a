"""MTCNN (Zhang et al., 2016): three cascaded CNNs, P-Net, R-Net and O-Net, with five landmarks.

The networks are written here in PyTorch to match the trained weights shipped in
``facerec/assets/mtcnn/mtcnn.npz`` (MIT licence, from the facenet-pytorch port; see
``ATTRIBUTION.md`` there). The cascade around them (image pyramid, thresholds, NMS, box
regression, square crops) is plain numpy + OpenCV and is shared by both backends: the torch
backend (this module, CPU or CUDA) and the onnxruntime backend (``mtcnn_onnx``), which differ
only in how the three networks are run. Sharing the cascade is what makes the two backends agree
to float precision rather than "roughly".

Input convention of these weights: RGB, normalised as (x - 127.5) * 0.0078125.

The detector is registered as ``"mtcnn"``; how its networks run is a registered MTCNN backend:
``"torch"`` here, ``"onnx"`` in ``mtcnn_onnx``.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from facerec.data.detection import Detection, register_detector
from facerec.registry import Registry

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "mtcnn"
WEIGHTS_FILE = ASSET_DIR / "mtcnn.npz"

# The cascade's standard settings (the paper's and every common port's).
DEFAULT_THRESHOLDS = (0.6, 0.7, 0.7)
PNET_STRIDE = 2  # P-Net's one 2x2 max-pool: each output cell moves 2 input pixels
PNET_CELL = 12  # P-Net's receptive field: a 12x12 window per output cell


def normalise(batch_hwc_uint8: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32 as the weights were trained."""
    x = (batch_hwc_uint8.astype(np.float32) - 127.5) * 0.0078125
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# ----------------------------------------------------------------------------------- networks
def load_weights(path: str | Path = WEIGHTS_FILE) -> dict[str, dict[str, np.ndarray]]:
    """{"pnet": {param: array}, "rnet": ..., "onet": ...} from the shipped .npz (no pickle)."""
    out: dict[str, dict[str, np.ndarray]] = {"pnet": {}, "rnet": {}, "onet": {}}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            net, param = key.split(".", 1)
            out[net][param] = z[key]
    return out


def build_nets(weights: dict[str, dict[str, np.ndarray]] | None = None):
    """The three torch modules with the weights loaded, in eval mode. Imports torch lazily so
    that the ONNX backend never needs it."""
    import torch
    from torch import nn

    class PNet(nn.Module):
        """Fully convolutional 12x12 proposal net: face probability + box offsets per cell."""

        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
            self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
            self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
            self.conv4_1 = nn.Conv2d(32, 2, 1)  # face / not-face logits
            self.conv4_2 = nn.Conv2d(32, 4, 1)  # box offsets (x1, y1, x2, y2) / box size

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
            prob = torch.softmax(self.conv4_1(x), dim=1)[:, 1]
            return prob, self.conv4_2(x)

    class RNet(nn.Module):
        """24x24 refinement net."""

        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
            self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
            self.dense5_1 = nn.Linear(128, 2)
            self.dense5_2 = nn.Linear(128, 4)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.prelu3(self.conv3(x))
            x = _caffe_flatten(x)
            x = self.prelu4(self.dense4(x))
            return torch.softmax(self.dense5_1(x), dim=1)[:, 1], self.dense5_2(x)

    class ONet(nn.Module):
        """48x48 output net: probability, box offsets and 5 landmarks (x1..x5, y1..y5)."""

        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
            self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
            self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
            self.dense6_1 = nn.Linear(256, 2)
            self.dense6_2 = nn.Linear(256, 4)
            self.dense6_3 = nn.Linear(256, 10)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.pool3(self.prelu3(self.conv3(x)))
            x = _caffe_flatten(self.prelu4(self.conv4(x)))
            x = self.prelu5(self.dense5(x))
            prob = torch.softmax(self.dense6_1(x), dim=1)[:, 1]
            return prob, self.dense6_2(x), self.dense6_3(x)

    def _caffe_flatten(x):
        # The dense layers were trained (in Caffe, on transposed images) with the features laid
        # out as (W, H, C); flattening in torch's (C, H, W) order scrambles them.
        return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)

    weights = load_weights() if weights is None else weights
    nets = {"pnet": PNet(), "rnet": RNet(), "onet": ONet()}
    for name, net in nets.items():
        state = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in weights[name].items()}
        net.load_state_dict(state, strict=True)
        net.eval()
    return nets


class NetRunner:
    """How the cascade runs the three networks: float32 NCHW in, numpy out. A backend implements
    ``_run(name, x)`` for the nets "pnet", "rnet" and "onet"."""

    def _run(self, name: str, x: np.ndarray) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def pnet(self, x: np.ndarray) -> tuple[np.ndarray, ...]:  # (N,h,w), (N,4,h,w)
        return self._run("pnet", x)

    def rnet(self, x: np.ndarray) -> tuple[np.ndarray, ...]:  # (N,), (N,4)
        return self._run("rnet", x)

    def onet(self, x: np.ndarray) -> tuple[np.ndarray, ...]:  # (N,), (N,4), (N,10)
        return self._run("onet", x)


class TorchRunner(NetRunner):
    """Runs the nets with torch on ``device`` ("cpu", "cuda", "cuda:1", ...)."""

    def __init__(self, device: str = "cpu", weights_path: str | Path | None = None):
        import torch

        self._torch = torch
        self.device = torch.device(device)
        weights = load_weights(weights_path) if weights_path else None
        self.nets = {k: v.to(self.device) for k, v in build_nets(weights).items()}

    def _run(self, name: str, x: np.ndarray):
        with self._torch.inference_mode():
            out = self.nets[name](self._torch.from_numpy(x).to(self.device))
            return tuple(o.float().cpu().numpy() for o in out)


# ------------------------------------------------------------------------------------ cascade
def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy NMS; indices kept, best first. mode "min" divides the overlap by the smaller box,
    which removes a small box lying inside a bigger one (MTCNN's last stage)."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = iw * ih
        if mode == "min":
            denom = np.minimum(areas[i], areas[rest])
        else:
            denom = areas[i] + areas[rest] - inter
        overlap = inter / np.maximum(denom, 1e-9)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Apply the nets' offsets, which are fractions of the box width / height."""
    wh = np.concatenate([boxes[:, 2:4] - boxes[:, 0:2]] * 2, axis=1)
    return boxes + reg * wh


def _square(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square around its centre (the nets take square crops), in whole
    pixels so the crop and the coordinates mapped back from it are the same box."""
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    cx = (boxes[:, 0] + boxes[:, 2]) / 2.0
    cy = (boxes[:, 1] + boxes[:, 3]) / 2.0
    side = np.maximum(np.round(side), 1.0)
    x1 = np.round(cx - side / 2.0)
    y1 = np.round(cy - side / 2.0)
    return np.stack([x1, y1, x1 + side, y1 + side], axis=1)


def _crops(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """(N, size, size, 3) uint8 crops of integer boxes; parts outside the image are zero (the
    original cascade's padding)."""
    h, w = image.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), dtype=np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.astype(np.int64)):
        patch = np.zeros((y2 - y1, x2 - x1, 3), dtype=np.uint8)
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
        if sx2 > sx1 and sy2 > sy1:
            patch[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = image[sy1:sy2, sx1:sx2]
        interp = cv2.INTER_AREA if patch.shape[0] > size else cv2.INTER_LINEAR
        out[i] = cv2.resize(patch, (size, size), interpolation=interp)
    return out


def _batched(fn, x: np.ndarray, batch: int):
    parts = [fn(x[i : i + batch]) for i in range(0, len(x), batch)]
    return tuple(np.concatenate(p, axis=0) for p in zip(*parts))


class MTCNN:
    """The MTCNN cascade over a ``NetRunner``; ``detect`` follows the ``FaceDetector`` protocol."""

    def __init__(
        self,
        runner: NetRunner,
        min_face_size: float = 20.0,
        thresholds: tuple[float, float, float] = DEFAULT_THRESHOLDS,
        factor: float = 0.709,
        batch_size: int = 512,
    ):
        if min_face_size <= 0 or not 0.0 < factor < 1.0:
            raise ValueError("min_face_size must be > 0 and factor in (0, 1)")
        self.runner = runner
        self.min_face_size = float(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.factor = float(factor)
        self.batch_size = int(batch_size)

    def _scales(self, h: int, w: int) -> list[float]:
        # A face of min_face_size pixels must shrink to P-Net's 12-pixel window at the first
        # scale; then shrink by `factor` until the whole image is smaller than one window.
        m = PNET_CELL / self.min_face_size
        scales, side = [], min(h, w) * m
        while side >= PNET_CELL:
            scales.append(m)
            m *= self.factor
            side *= self.factor
        return scales

    def _stage1(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        found = []
        for s in self._scales(h, w):
            hs, ws = max(int(math.ceil(h * s)), PNET_CELL), max(int(math.ceil(w * s)), PNET_CELL)
            scaled = cv2.resize(image, (ws, hs), interpolation=cv2.INTER_AREA)
            prob, reg = self.runner.pnet(normalise(scaled[None]))
            ys, xs = np.nonzero(prob[0] >= self.thresholds[0])
            if ys.size == 0:
                continue
            sx, sy = ws / w, hs / h  # the real per-axis scale after rounding the size up
            cand = np.stack(
                [
                    PNET_STRIDE * xs / sx,
                    PNET_STRIDE * ys / sy,
                    (PNET_STRIDE * xs + PNET_CELL) / sx,
                    (PNET_STRIDE * ys + PNET_CELL) / sy,
                ],
                axis=1,
            )
            cand = np.concatenate(
                [cand, reg[0][:, ys, xs].T, prob[0][ys, xs][:, None]], axis=1
            )
            found.append(cand[nms(cand[:, :4], cand[:, 8], 0.5)])
        if not found:
            return np.zeros((0, 4))
        cand = np.concatenate(found, axis=0)
        cand = cand[nms(cand[:, :4], cand[:, 8], 0.7)]
        return _square(_regress(cand[:, :4], cand[:, 4:8]))

    def detect(self, image: np.ndarray) -> list[Detection]:
        """All faces in an RGB uint8 (H, W, 3) image, highest score first."""
        image = np.ascontiguousarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
        boxes = self._stage1(image)
        if len(boxes) == 0:
            return []

        # Stage 2: R-Net rescores and refines every proposal on a 24x24 crop.
        prob, reg = _batched(self.runner.rnet, normalise(_crops(image, boxes, 24)), self.batch_size)
        ok = prob >= self.thresholds[1]
        boxes, prob, reg = boxes[ok], prob[ok], reg[ok]
        if len(boxes) == 0:
            return []
        keep = nms(boxes, prob, 0.7)
        boxes = _square(_regress(boxes[keep], reg[keep]))

        # Stage 3: O-Net on 48x48 crops gives the final score, box and landmarks.
        prob, reg, lm = _batched(self.runner.onet, normalise(_crops(image, boxes, 48)), self.batch_size)
        ok = prob >= self.thresholds[2]
        boxes, prob, reg, lm = boxes[ok], prob[ok], reg[ok], lm[ok]
        if len(boxes) == 0:
            return []
        # Landmarks are fractions of the crop box: x1..x5 then y1..y5.
        wh = boxes[:, 2:4] - boxes[:, 0:2]
        xs = boxes[:, None, 0] + lm[:, 0:5] * wh[:, None, 0]
        ys = boxes[:, None, 1] + lm[:, 5:10] * wh[:, None, 1]
        points = np.stack([xs, ys], axis=2)
        boxes = _regress(boxes, reg)
        keep = nms(boxes, prob, 0.7, mode="min")
        return [
            Detection(
                box=boxes[i].astype(np.float32),
                score=float(prob[i]),
                landmarks=points[i].astype(np.float32),
            )
            for i in keep
        ]


# A backend factory: ``fn(device, model_dir, threads, weights_path) -> NetRunner``.
_BACKENDS: Registry[NetRunner] = Registry("MTCNN backend")
register_mtcnn_backend = _BACKENDS.register


@register_mtcnn_backend(name="torch")
def torch_runner(device: str = "cpu", model_dir=None, threads: int | None = None, weights_path=None) -> NetRunner:
    """``threads``: if given, ``torch.set_num_threads`` (process-wide); ``weights_path``: default
    ``model_dir/mtcnn.npz`` if that exists, else the shipped weights."""
    if weights_path is None and model_dir and (Path(model_dir) / "mtcnn.npz").is_file():
        weights_path = Path(model_dir) / "mtcnn.npz"
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    return TorchRunner(device=device, weights_path=weights_path)


@register_detector(name="mtcnn")
def create_mtcnn(device: str = "cpu", backend: str = "torch", model_dir=None, threads: int | None = None,
                 weights_path=None, **kw) -> MTCNN:
    """The shipped MTCNN, its networks run by the registered MTCNN backend ``backend``."""
    runner = _BACKENDS.create(backend, device=device, model_dir=model_dir, threads=threads,
                              weights_path=weights_path)
    return MTCNN(runner, **kw)


def convert_facenet_pytorch_weights(src_dir: str | Path, out_path: str | Path = WEIGHTS_FILE) -> None:
    """One-off: turn facenet-pytorch's ``{pnet,rnet,onet}.pt`` state dicts (from its wheel's
    ``facenet_pytorch/data/``) into the shipped ``mtcnn.npz``. Only needs torch, not the package."""
    import torch

    arrays = {}
    for net in ("pnet", "rnet", "onet"):
        state = torch.load(Path(src_dir) / f"{net}.pt", map_location="cpu", weights_only=True)
        for k, v in state.items():
            arrays[f"{net}.{k}"] = v.detach().float().numpy()
    np.savez_compressed(out_path, **arrays)
