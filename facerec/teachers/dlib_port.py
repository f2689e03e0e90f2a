"""dlib's ResNet face descriptor (``dlib_face_recognition_resnet_model_v1.dat``) in PyTorch.

A faithful port, without dlib: :func:`read_dlib_net` parses dlib's own serialisation of the network
into numpy arrays, and :class:`facerec.models.dlib_resnet.DlibResNet` (the fixed layout, filled by
:func:`fill_dlib_resnet`) computes, from a 150 x 150 RGB face chip cut as dlib's
``get_face_chip`` cuts it, the 128-d descriptor ``dlib.face_recognition_model_v1`` returns (not
normalised; its length is about 1). The weights are dlib's (CC0); the code follows dlib's sources:

* network: ``examples/dnn_face_recognition_ex.cpp`` (``anet_type``): con 7x7/2 (32), affine, relu,
  max-pool 3x3/2, residual stages of 32 (3 blocks), 64 (down + 3), 128 (down + 2), 256 (down + 2),
  256 (down), global average pool, a 256 -> 128 linear map without bias;
* ``dnn/layers.h``: convolutions and pools with stride 2 do not pad (stride 1 pads kernel/2);
  ``affine`` is a per-channel ``gamma * x + beta``; ``add_prev`` adds two tensors of different
  shapes as if the smaller one were zero-padded at the end of each axis (extra channels, last rows
  and columns): the 4 x 4 shortcut meets a 3 x 3 block output at 256 channels, and so on;
* ``dnn/input.h``: ``(pixel - channel mean) / 256`` with the means 122.782, 117.001, 104.298 (RGB);
* ``serialize.h`` / ``dnn/core.h``: the file is the loss layer, then every layer's header from the
  top down, then the input layer, then every layer's details from the bottom up (``add_layer``
  writes its sub-network before its own details); integers are a length byte (0x80: negative)
  and little-endian bytes, floats a (mantissa, exponent) integer pair, tensors little-endian
  float32 after their shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: dlib's input_rgb_image_sized means (R, G, B) and scale; read back from the file too.
CHIP_SIZE = 150
EMBEDDING_SIZE = 128


class DlibFormatError(ValueError):
    """The file is not a dlib network of the expected architecture."""


@dataclass
class Layer:
    kind: str  # "con", "affine", "relu", "max_pool", "avg_pool", "add_prev", "fc"
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


class _Reader:
    """dlib's serialize.h primitives over a bytes buffer."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> int:
        """Advance ``n`` bytes; the offset where they start."""
        if n < 0 or self.pos + n > len(self.data):
            raise DlibFormatError(f"unexpected end of file (needed {n} bytes at byte {self.pos})")
        self.pos += n
        return self.pos - n

    def byte(self) -> int:
        return self.data[self.take(1)]

    def int(self) -> int:
        head = self.byte()
        size = head & 0x0F
        if size == 0 or size > 8:
            raise DlibFormatError(f"bad integer header 0x{head:02x} at byte {self.pos - 1}")
        start = self.take(size)
        value = int.from_bytes(self.data[start:start + size], "little")
        return -value if head & 0x80 else value

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        if exponent >= 32000:  # float_details' inf / nan codes
            raise DlibFormatError("non-finite float in the network file")
        return float(np.ldexp(float(mantissa), exponent))

    def bool(self) -> bool:
        ch = self.byte()
        if ch not in (ord("0"), ord("1")):
            raise DlibFormatError(f"bad bool byte {ch} at {self.pos - 1}")
        return ch == ord("1")

    def string(self) -> str:
        n = self.int()
        if n < 0:
            raise DlibFormatError(f"bad string length {n} at byte {self.pos}")
        start = self.take(n)
        return self.data[start:start + n].decode("latin-1")

    def shape(self, version: int) -> tuple[int, int, int, int]:
        got = self.int()
        if got != version:
            raise DlibFormatError(f"tensor version {got}, expected {version}")
        return tuple(self.int() for _ in range(4))

    def tensor(self) -> np.ndarray:
        n, k, nr, nc = self.shape(2)
        count = n * k * nr * nc
        out = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.take(4 * count))
        return out.reshape(n, k, nr, nc).astype(np.float32)

    def alias(self) -> tuple[int, int, int, int]:
        return self.shape(1)


def _expect(actual, wanted, what: str):
    if actual != wanted:
        raise DlibFormatError(f"{what}: found {actual!r}, expected {wanted!r}")


def _read_details(r: _Reader) -> Layer:
    """One layer's details (dnn/layers.h), dispatched on its version string."""
    version = r.string()
    if version in ("con_4", "con_5", "con_6"):
        params = r.tensor().ravel()
        num_filters, nr, nc = r.int(), r.int(), r.int()
        stride, pad = (r.int(), r.int()), (r.int(), r.int())
        filt, bias = r.alias(), r.alias()
        for _ in range(4):
            r.float()  # learning-rate / weight-decay multipliers
        use_bias = r.bool() if version != "con_4" else True
        if version == "con_6":
            r.bool()  # use_relu: fused relu, absent from this network
        n_w = int(np.prod(filt))
        weight = params[:n_w].reshape(filt)
        b = params[n_w:n_w + int(np.prod(bias))] if use_bias else np.zeros(num_filters, np.float32)
        _expect(weight.shape[0], num_filters, "con filters")
        return Layer("con", {"weight": weight, "bias": b.reshape(-1)},
                     {"kernel": (nr, nc), "stride": stride, "padding": pad})
    if version in ("affine_", "affine_2"):
        params = r.tensor().ravel()
        gamma, beta = r.alias(), r.alias()
        mode = r.int()
        if version == "affine_2":
            r.bool()  # disabled
        n_g = int(np.prod(gamma))
        return Layer("affine", {"gamma": params[:n_g], "beta": params[n_g:n_g + int(np.prod(beta))]},
                     {"mode": mode})
    if version in ("relu_", "relu_2"):
        if version == "relu_2":
            r.bool()
        return Layer("relu")
    if version in ("max_pool_2", "avg_pool_2"):
        nr, nc, sy, sx, py, px = (r.int() for _ in range(6))
        return Layer(version[:-2], info={"kernel": (nr, nc), "stride": (sy, sx), "padding": (py, px)})
    if version == "add_prev_":
        return Layer("add_prev")
    if version in ("fc_2", "fc_3"):
        num_outputs, num_inputs = r.int(), r.int()
        params = r.tensor().ravel()
        r.alias(), r.alias()  # weights and biases views of params
        bias_mode = r.int()
        for _ in range(4):
            r.float()
        if version == "fc_3":
            r.bool()
        n_w = num_inputs * num_outputs
        w = params[:n_w].reshape(num_inputs, num_outputs)
        b = params[n_w:n_w + num_outputs] if bias_mode == 0 else None  # 0: FC_HAS_BIAS
        return Layer("fc", {"weight": w} if b is None else {"weight": w, "bias": b})
    raise DlibFormatError(f"unsupported layer {version!r} at byte {r.pos}")


def _skip_add_layer_state(r: _Reader, version: int) -> None:
    """add_layer's trailing state (flags and scratch tensors), not needed for inference."""
    r.bool(), r.bool(), r.bool()
    r.tensor(), r.tensor()  # x_grad, cached_output
    if version >= 2:
        r.tensor()  # params_grad (subnet add_layer) / grad_final (input add_layer)


def read_dlib_net(path: str | Path) -> tuple[dict, list[Layer]]:
    """Parse a dlib DNN file: (``{"loss":..., "input":...}``, the layers from input to output)."""
    r = _Reader(Path(path).read_bytes())
    _expect(r.int(), 1, "add_loss_layer version")
    loss = r.string()
    if loss not in ("loss_metric_", "loss_metric_2"):
        raise DlibFormatError(f"not a metric-learning network: loss {loss!r}")
    if loss == "loss_metric_2":
        r.float(), r.float()  # margin, distance threshold
    headers = []  # add_layer (2) / tag or skip (1) versions, top down, until the input add_layer
    while True:
        v = r.int()
        headers.append(v)
        if v == 3:
            break
        if v not in (1, 2) or len(headers) > 1000:
            raise DlibFormatError(f"unexpected layer header {v}")
    _expect(r.string(), "input_rgb_image_sized", "input layer")
    means = (r.float(), r.float(), r.float())
    size = (r.int(), r.int())
    _expect(size, (CHIP_SIZE, CHIP_SIZE), "input size")
    layers = []
    for v in [3] + [h for h in reversed(headers[:-1]) if h == 2]:
        layers.append(_read_details(r))
        _skip_add_layer_state(r, v)
        if v == 3:
            r.int()  # _sample_expansion_factor
    _expect(r.pos, len(r.data), "bytes read")
    return {"loss": loss, "input_means": means, "input_size": size}, layers


def fill_dlib_resnet(model, meta: dict, layers: list[Layer]):
    """Copy the parsed weights into :class:`facerec.models.dlib_resnet.DlibResNet` (the fixed
    layout), checking every layer against it: another network's file fails in one line."""
    import torch

    from facerec.models.dlib_resnet import BLOCKS, INPUT_MEANS, STEM_CHANNELS

    seq = list(layers)
    kinds = [layer.kind for layer in seq]
    if kinds[:4] != ["con", "affine", "relu", "max_pool"] or kinds[-2:] != ["avg_pool", "fc"]:
        raise DlibFormatError(f"unexpected stem/head: {kinds[:4]} ... {kinds[-2:]}")
    if not np.allclose(meta["input_means"], INPUT_MEANS):
        raise DlibFormatError(f"input means {meta['input_means']}, expected {INPUT_MEANS}")

    def conv(dst, layer: Layer, out_channels: int, kernel: int, stride: int, pad: int) -> None:
        w = layer.arrays["weight"]
        found = (w.shape[0], layer.info["kernel"], layer.info["stride"], layer.info["padding"])
        _expect(found, (out_channels, (kernel, kernel), (stride, stride), (pad, pad)), "con layer")
        _expect(tuple(dst.weight.shape), w.shape, "con weight")
        dst.weight.data = torch.from_numpy(w.copy())
        dst.bias.data = torch.from_numpy(layer.arrays["bias"].copy())

    def affine(dst, layer: Layer) -> None:
        _expect(layer.kind, "affine", "layer")
        dst.gamma.data = torch.from_numpy(layer.arrays["gamma"].copy()).view(1, -1, 1, 1)
        dst.beta.data = torch.from_numpy(layer.arrays["beta"].copy()).view(1, -1, 1, 1)

    conv(model.stem, seq[0], STEM_CHANNELS, 7, 2, 0)
    affine(model.stem_bn, seq[1])
    _expect((seq[3].info["kernel"], seq[3].info["stride"]), ((3, 3), (2, 2)), "max pool")
    i = 4
    for block, (out_channels, down) in zip(model.blocks, BLOCKS, strict=True):
        body = kinds[i:i + 5]
        tail = kinds[i + 5:i + 8] if down else kinds[i + 5:i + 7]
        if body != ["con", "affine", "relu", "con", "affine"] or tail[-2:] != ["add_prev", "relu"] \
                or (tail[0] == "avg_pool") != down:
            raise DlibFormatError(f"unexpected residual block at layer {i}: {kinds[i:i + 8]}")
        conv(block.conv1, seq[i], out_channels, 3, 2 if down else 1, 0 if down else 1)
        affine(block.bn1, seq[i + 1])
        conv(block.conv2, seq[i + 3], out_channels, 3, 1, 1)
        affine(block.bn2, seq[i + 4])
        i += 5 + len(tail)
    if i != len(seq) - 2 or seq[i].info["kernel"] != (0, 0):
        raise DlibFormatError(f"unexpected layers after the residual stages: {kinds[i:]}")
    w = seq[-1].arrays["weight"]  # (inputs, outputs): dlib's fc computes x @ W
    if "bias" in seq[-1].arrays:
        raise DlibFormatError("the descriptor's linear map has a bias; dlib's model v1 has none")
    _expect(tuple(model.fc.weight.shape), w.T.shape, "fc weight")
    model.fc.weight.data = torch.from_numpy(np.ascontiguousarray(w.T))
    return model


def load_dlib_resnet(path: str | Path):
    """The torch port of a dlib face-recognition network file, in eval mode, float32, CPU: a
    :class:`facerec.models.dlib_resnet.DlibResNet` (RGB 150 x 150 chip in 0..255 -> descriptor)."""
    from facerec.models.dlib_resnet import DlibResNet

    meta, layers = read_dlib_net(path)
    return fill_dlib_resnet(DlibResNet(), meta, layers).eval()


def embed_chips(model, chips: np.ndarray, batch: int = 16) -> np.ndarray:
    """dlib's raw descriptors for (N, 150, 150, 3) uint8 RGB chips (``dlib.get_face_chip``'s)."""
    import torch

    chips = np.asarray(chips)
    if chips.ndim == 3:
        chips = chips[None]
    if chips.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3):
        raise ValueError(f"expected (N, {CHIP_SIZE}, {CHIP_SIZE}, 3) RGB chips, got {chips.shape}")
    out = []
    with torch.inference_mode():
        for s in range(0, len(chips), batch):
            x = torch.from_numpy(chips[s:s + batch].astype(np.float32)).permute(0, 3, 1, 2).contiguous()
            out.append(model(x).numpy())
    return np.concatenate(out) if out else np.zeros((0, EMBEDDING_SIZE), np.float32)


def export_dlib_onnx(model, path: str | Path, opset: int = 17) -> Path:
    """Write the port as ONNX: input ``chip`` (N, 3, 150, 150) float32 RGB in 0..255, output
    ``descriptor`` (N, 128), dynamic batch. TorchScript exporter (its opset 17 is native)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, CHIP_SIZE, CHIP_SIZE)
    with torch.no_grad():
        torch.onnx.export(model.eval(), (example,), str(path), input_names=["chip"],
                          output_names=["descriptor"], opset_version=opset, dynamo=False,
                          dynamic_axes={"chip": {0: "batch"}, "descriptor": {0: "batch"}})
    return path


# --- chip geometry --------------------------------------------------------------------------

#: dlib's get_face_chip_details for the 5-point model (image_transforms/interpolation.h): where
#: the shape predictor's parts 0..4 (eye corners, outer then inner, of the viewer's right eye, then
#: of the left eye; the base of the nose) go, as fractions of the unpadded face square.
DLIB_5_POINTS = np.array([[0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677],
                          [0.1205750620789, 0.2137274526848], [0.3340850613712, 0.2290642403242],
                          [0.4901123135679, 0.6277975316475]])


def dlib_chip_matrix(parts: np.ndarray, size: int = CHIP_SIZE, padding: float = 0.25) -> np.ndarray:
    """The 2 x 3 image -> chip matrix of ``dlib.get_face_chip(image, shape, size, padding)``.

    dlib (``chip_details``, ``get_mapping_to_chip``) fits the chip -> image similarity T (least
    squares, Umeyama; scale ``s``) from the template above to the five parts, centres an extraction
    rectangle of side ``size * s - 1`` image pixels (``centered_drect``) on T(size / 2, size / 2),
    and maps its corners to pixels 0 and ``size - 1``: in T's chip frame the corners sit at
    ``a = 1 / (2 s)`` and ``size - a``. ``cv2.warpAffine`` with this matrix (bilinear, black
    border) reproduces dlib's chip up to interpolation rounding.
    """
    from facerec.data.align import umeyama

    chip_points = (padding + DLIB_5_POINTS) / (2 * padding + 1) * size
    t = umeyama(chip_points, np.asarray(parts, np.float64).reshape(5, 2))
    a = 0.5 / np.sqrt(abs(np.linalg.det(t[:2, :2])))
    k = (size - 1) / (size - 2 * a)
    return (np.array([[k, 0, -k * a], [0, k, -k * a], [0, 0, 1]]) @ np.linalg.inv(t))[:2]
