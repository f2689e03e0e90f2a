"""Inference backends: one ``run(batch) -> {output name: array}`` over onnxruntime or torch.

A batch is either aligned crops as uint8 (N, S, S, 3) RGB (what ``norm_crop`` returns; a single
(S, S, 3) crop is a batch of one) or float (N, 3, S, S) already normalised to (x - 127.5) / 127.5.
Outputs are float32 numpy arrays named as in the exported graph: ``embedding`` (not normalised),
``quality`` (models with a quality head), ``feature_<k>`` (OOD features).

Both backends resolve their device through :mod:`facerec.runtime.device`, so the strict
``FACEREC_DEVICE`` policy holds for either. The onnxruntime CUDA and TensorRT paths are implemented
but have not been run in this project's environment (its GPU machine has the CPU build of
onnxruntime); GPU serving is tested through the torch backend.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

import facerec
from facerec.bundle import METADATA_PREFIX, contract_from_metadata
from facerec.contract import EmbeddingContract
from facerec.runtime.device import (
    DeviceChoice,
    ort_providers,
    require_torch_device,
    resolve_device,
    verify_ort_session,
)


@runtime_checkable
class Backend(Protocol):
    contract: EmbeddingContract
    device: str  # "cpu" | "cuda:<n>"
    provider: str  # the onnxruntime provider doing the work, or "torch"
    output_names: list[str]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    def describe(self) -> dict: ...


def to_model_input(batch: np.ndarray, size: int) -> np.ndarray:
    """uint8 NHWC crops or normalised float NCHW -> contiguous float32 NCHW (normalised)."""
    batch = np.asarray(batch)
    if batch.dtype == np.uint8:
        if batch.ndim == 3:
            batch = batch[None]
        if batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
            raise ValueError(f"uint8 crops must be (N, {size}, {size}, 3) RGB, got {batch.shape}")
        x = batch.transpose(0, 3, 1, 2).astype(np.float32)
        return np.ascontiguousarray((x - 127.5) / 127.5)
    if batch.dtype.kind == "f":
        if batch.ndim != 4 or batch.shape[1:] != (3, size, size):
            raise ValueError(f"float input must be (N, 3, {size}, {size}) normalised, got {batch.shape}")
        return np.ascontiguousarray(batch, dtype=np.float32)
    raise ValueError(f"unsupported input dtype {batch.dtype}; pass uint8 crops or normalised float32")


def _choice(device: str | DeviceChoice | None) -> DeviceChoice:
    return device if isinstance(device, DeviceChoice) else resolve_device(device)


def _common_description(backend, kind: str, choice: DeviceChoice) -> dict:
    c = backend.contract
    return {
        "backend": kind,
        "device": backend.device,
        "provider": backend.provider,
        "model_name": c.model_name,
        "model_version": c.model_version,
        "contract_id": c.contract_id,
        "contract": c.identity(),
        "output_names": list(backend.output_names),
        "device_policy": choice.describe(),
        "versions": {"facerec": facerec.__version__, "python": platform.python_version()},
    }


class OnnxRuntimeBackend:
    """An onnxruntime session over an exported graph; the contract comes from its metadata."""

    def __init__(
        self,
        path: str | Path,
        device: str | DeviceChoice | None = None,
        tensorrt: bool = False,
        threads: int | None = None,
        spin: bool = False,
        max_batch_size: int = 64,
        cuda_options: dict | None = None,
        tensorrt_options: dict | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.choice = _choice(device)
        self.tensorrt = tensorrt
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # warnings only about constant folding of fp16 graphs
        if threads:
            opts.intra_op_num_threads = int(threads)
        # Spinning worker threads shave latency on dedicated cores but burn the CPU that face
        # detection (running beside the model in a server) needs; measured on a busy 2-core machine,
        # off was ~1.5x faster. spin=True for a machine that does nothing else.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        trt = None
        if tensorrt:
            # The input name and 112 px are what facerec exports; other graphs pass their own profile
            # shapes in tensorrt_options (the metadata is only readable once a session exists).
            inp = "input"
            trt = {
                # Dynamic batch needs an explicit shape profile; engines are cached because building
                # one takes minutes. fp16 engines are built from the fp32 graph (TensorRT chooses).
                "trt_fp16_enable": True,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(self.path.parent / "trt_cache"),
                "trt_profile_min_shapes": f"{inp}:1x3x112x112",
                "trt_profile_opt_shapes": f"{inp}:{max(1, max_batch_size // 2)}x3x112x112",
                "trt_profile_max_shapes": f"{inp}:{max_batch_size}x3x112x112",
                **(tensorrt_options or {}),
            }
        providers = ort_providers(self.choice, tensorrt, cuda_options, trt)
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        self.provider = verify_ort_session(self.session, self.choice, tensorrt)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.contract = contract_from_metadata(self.metadata)
        self.precision = self.metadata.get(METADATA_PREFIX + "precision", "fp32")
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.device = self.choice.torch_device
        self.input_size = self.contract.input_size

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Run each batch size once: GPU providers pick kernels per new input shape on first use."""
        for b in batch_sizes:
            self.run(np.zeros((b, self.input_size, self.input_size, 3), np.uint8))

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        x = to_model_input(batch, self.input_size)
        outs = self.session.run(None, {self.input_name: x})
        return {n: np.asarray(o, dtype=np.float32) for n, o in zip(self.output_names, outs)}

    def describe(self) -> dict:
        import onnxruntime as ort

        info = _common_description(self, "onnxruntime", self.choice)
        info.update(
            path=str(self.path),
            precision=self.precision,
            providers=list(self.session.get_providers()),
        )
        info["versions"]["onnxruntime"] = ort.__version__
        return info


class TorchBackend:
    """The torch model of a torch artefact (or a model object with its contract) on CPU or CUDA.

    ``amp``: ``"fp16"`` / ``"bf16"`` autocast on CUDA (the CPU always runs fp32: CPU autocast is slower
    than fp32 for these models). ``compile``: ``torch.compile(dynamic=True)``, so the varying batch
    sizes of the micro-batcher do not each trigger a recompilation; call :meth:`warmup` before
    serving, the first call compiles. A string names the compile backend (default "inductor").
    """

    def __init__(
        self,
        source,
        device: str | DeviceChoice | None = None,
        contract: EmbeddingContract | None = None,
        amp: str | None = None,
        compile: bool | str = False,
        channels_last: bool = False,
        return_features: bool = True,
        threads: int | None = None,
    ) -> None:
        import torch

        from facerec.export.torch_artifact import load_torch_artifact
        from facerec.models.export_wrapper import ExportWrapper

        self.choice = _choice(device)
        self.torch_device = require_torch_device(self.choice)
        if threads and not self.choice.is_cuda:
            torch.set_num_threads(int(threads))  # process-wide: torch has no per-model thread pool
        if isinstance(source, (str, Path)):
            artifact = load_torch_artifact(source, map_location="cpu")
            model, self.contract, self.path = artifact.model, artifact.contract, str(source)
        else:
            if contract is None:
                raise ValueError("a model object needs its EmbeddingContract")
            model, self.contract, self.path = source, contract, None
        if amp not in (None, "fp16", "bf16"):
            raise ValueError(f"amp must be None, 'fp16' or 'bf16', not {amp!r}")
        if amp and not self.choice.is_cuda:
            raise ValueError(f"amp={amp!r} needs CUDA; on the CPU the torch backend runs fp32")
        self.amp = amp
        model = model.to(self.torch_device).float().eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self.wrapper = ExportWrapper(model, return_features=return_features).eval()
        self.output_names = self.wrapper.output_names
        self._forward = self.wrapper
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            self._forward = torch.compile(self.wrapper, dynamic=True, backend=backend)
        self.compiled = compile
        self.device = str(self.torch_device)
        self.provider = "torch"
        self.input_size = self.contract.input_size

    def _tensor(self, batch: np.ndarray):
        import torch

        batch = np.asarray(batch)
        if batch.dtype == np.uint8:
            # Upload uint8 (4x fewer bytes than float) and normalise on the device.
            if batch.ndim == 3:
                batch = batch[None]
            size = self.input_size
            if batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
                raise ValueError(f"uint8 crops must be (N, {size}, {size}, 3) RGB, got {batch.shape}")
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.torch_device, non_blocking=True)
            x = (x.permute(0, 3, 1, 2).float() - 127.5) / 127.5
        else:
            x = torch.from_numpy(to_model_input(batch, self.input_size)).to(self.torch_device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        ctx = contextlib.nullcontext()
        if self.amp:
            ctx = torch.autocast("cuda", dtype=torch.float16 if self.amp == "fp16" else torch.bfloat16)
        with torch.inference_mode(), ctx:
            outs = self._forward(self._tensor(batch))
        return {n: o.float().cpu().numpy() for n, o in zip(self.output_names, outs)}

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        size = self.input_size
        for b in batch_sizes:
            self.run(np.zeros((b, size, size, 3), np.uint8))

    def describe(self) -> dict:
        import torch

        info = _common_description(self, "torch", self.choice)
        info.update(path=self.path, precision=self.amp or "fp32", compiled=self.compiled)
        info["versions"].update(torch=torch.__version__, cuda=torch.version.cuda)
        if self.choice.is_cuda:
            info["gpu_name"] = torch.cuda.get_device_name(self.torch_device)
        return info


def load_backend(
    path: str | Path, backend: str = "auto", device: str | DeviceChoice | None = None, **kw
) -> Backend:
    """``.onnx`` -> onnxruntime, ``.pt`` (torch artefact) -> torch, unless ``backend`` names one."""
    path = Path(path)
    if backend == "auto":
        backend = "torch" if path.suffix in (".pt", ".pth") else "onnxruntime"
    if backend == "onnxruntime":
        return OnnxRuntimeBackend(path, device=device, **kw)
    if backend == "torch":
        return TorchBackend(path, device=device, **kw)
    raise ValueError(f"unknown backend {backend!r}; use 'onnxruntime', 'torch' or 'auto'")
