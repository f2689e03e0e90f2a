"""MTCNN's three networks through onnxruntime: torch-free at run time.

The ONNX files (``pnet.onnx`` with dynamic batch/height/width, ``rnet.onnx`` / ``onet.onnx`` with
dynamic batch) ship prebuilt in ``facerec/assets/mtcnn/``, exported from the torch modules of
``facerec.data.mtcnn`` by ``export_onnx``. Lookup order: ``model_dir`` if given, else the shipped
assets, else the user cache (``$FACEREC_CACHE`` or ``~/.cache/facerec``)/mtcnn. When the files
are missing where they are looked for, they are exported there once, which needs torch and
onnxscript (torch's exporter); running them needs only onnxruntime and numpy.

The cascade itself (pyramid, NMS, box regression) is ``facerec.data.mtcnn.MTCNN``, numpy only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from facerec.data.mtcnn import ASSET_DIR, NetRunner, register_mtcnn_backend

NET_NAMES = ("pnet", "rnet", "onet")
_OUTPUTS = {"pnet": ["prob", "reg"], "rnet": ["prob", "reg"], "onet": ["prob", "reg", "landmarks"]}
_INPUT_SIZE = {"pnet": 12, "rnet": 24, "onet": 48}


def default_cache_dir() -> Path:
    root = os.environ.get("FACEREC_CACHE") or Path.home() / ".cache" / "facerec"
    return Path(root) / "mtcnn"


def export_onnx(
    out_dir: str | Path, weights_path: str | Path | None = None, opset: int = 18
) -> list[Path]:
    """Export the torch nets to ``out_dir/{pnet,rnet,onet}.onnx``; returns the paths. Uses
    torch's torch.export-based exporter (needs onnxscript); the files are marked IR version 8,
    which they satisfy (plain opset-18 ops), so that onnxruntime releases older than the
    exporter's default IR 10 load them too."""
    import torch

    from facerec.data.mtcnn import build_nets, load_weights

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nets = build_nets(load_weights(weights_path) if weights_path else None)
    batch = torch.export.Dim("batch", min=1)
    paths = []
    for name in NET_NAMES:
        size = _INPUT_SIZE[name]
        if name == "pnet":  # whole pyramid levels: any height and width of at least one cell
            dummy = torch.zeros(2, 3, 4 * size, 5 * size)
            height, width = torch.export.Dim("height", min=size), torch.export.Dim("width", min=size)
            dims = {0: batch, 2: height, 3: width}
        else:  # batches of fixed-size crops
            dummy = torch.zeros(2, 3, size, size)
            dims = {0: batch}
        program = torch.onnx.export(
            nets[name], (dummy,), input_names=["input"], output_names=_OUTPUTS[name],
            dynamic_shapes={"x": dims}, opset_version=opset, dynamo=True, external_data=False,
            verbose=False,
        )
        proto = program.model_proto
        proto.ir_version = 8
        path = out_dir / f"{name}.onnx"
        tmp = path.with_suffix(f".onnx.tmp{os.getpid()}")
        tmp.write_bytes(proto.SerializeToString())
        os.replace(tmp, path)  # atomic: a concurrent reader never sees a half-written file
        paths.append(path)
    return paths


def resolve_model_dir(model_dir: str | Path | None = None) -> Path:
    """The folder holding the three ONNX files, exporting them there if needed."""
    candidates = [Path(model_dir)] if model_dir else [ASSET_DIR, default_cache_dir()]
    for d in candidates:
        if all((d / f"{n}.onnx").is_file() for n in NET_NAMES):
            return d
    target = candidates[-1]
    export_onnx(target)
    return target


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(
                "device='cuda' with the onnx backend needs onnxruntime-gpu (CUDAExecutionProvider); "
                f"available providers: {available}"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRunner(NetRunner):
    """The ``NetRunner`` of ``facerec.data.mtcnn`` backed by three onnxruntime sessions."""

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu", threads: int = 0):
        import onnxruntime as ort

        self.model_dir = resolve_model_dir(model_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0: onnxruntime's default (one per core)
        opts.log_severity_level = 3
        providers = _providers(device)
        self.sessions = {
            n: ort.InferenceSession(str(self.model_dir / f"{n}.onnx"), opts, providers=providers)
            for n in NET_NAMES
        }

    def _run(self, name: str, x: np.ndarray):
        return tuple(self.sessions[name].run(None, {"input": np.ascontiguousarray(x, dtype=np.float32)}))


@register_mtcnn_backend(name="onnx")
def onnx_runner(device: str = "cpu", model_dir=None, threads: int | None = None, weights_path=None) -> OnnxRunner:
    """``threads``: intra-op threads per session, default 1 (fastest for photo-sized images)."""
    if weights_path:
        raise ValueError("weights_path is for backend='torch'; the onnx backend reads model_dir")
    return OnnxRunner(model_dir=model_dir, device=device, threads=1 if threads is None else int(threads))
