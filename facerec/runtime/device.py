"""Which device inference runs on, and the strict rule that it never silently falls back to the CPU.

``FACEREC_DEVICE`` (or an explicit setting): ``auto`` (default), ``cuda`` (= ``cuda:0``), ``cuda:N``,
``cpu``.

- ``auto``: the GPU when the machine has one, the CPU when it has none, so the same command works on
  a laptop. It is strict: on a machine *with* a GPU, a backend that cannot use it (onnxruntime
  without the CUDA provider, a CPU build of torch, missing CUDA libraries) raises
  :class:`DeviceUnavailableError` saying why and what to install. Users complain most about servers
  that run on the CPU while they believe they run on the GPU; ``FACEREC_DEVICE=cpu`` is the way to
  choose the CPU on purpose.
- ``cuda``: always requires the GPU; ``cpu``: always the CPU.

"The machine has a GPU" (:func:`probe_gpu`), first rule that applies:

1. ``CUDA_VISIBLE_DEVICES`` set to ``""``, ``-1`` or ``NoDevFiles``: no GPU (hidden on purpose; CUDA
   itself then sees none).
2. torch is importable and ``torch.cuda.is_available()``: a GPU.
3. a device node ``/dev/nvidia<N>`` exists: a GPU (torch may be a CPU build; the backend decides
   whether it can use it, and refuses loudly if not).
4. ``nvidia-smi -L`` lists a GPU: a GPU (e.g. WSL, where there are no ``/dev/nvidia*`` nodes).
5. otherwise no GPU.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass

DEVICE_ENV = "FACEREC_DEVICE"
CUDA_EP = "CUDAExecutionProvider"
TENSORRT_EP = "TensorrtExecutionProvider"
CPU_EP = "CPUExecutionProvider"
_HIDDEN = {"", "-1", "nodevfiles"}


class DeviceUnavailableError(RuntimeError):
    """The requested (or, under ``auto``, the present) GPU cannot be used by this backend."""


@dataclass(frozen=True)
class GpuProbe:
    present: bool
    source: str  # which rule decided (see the module docstring)
    detail: str


def _torch_cuda() -> tuple[bool, str] | None:
    """(available, detail), or None when torch is not importable."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - a broken torch install must not hide the other rules
        return None
    if torch.cuda.is_available():
        return True, f"torch sees {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}"
    return False, f"torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no GPU"


def _dev_nodes() -> list[str]:
    return sorted(glob.glob("/dev/nvidia[0-9]*"))


def _nvidia_smi() -> list[str]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return (
        [line for line in out.stdout.splitlines() if line.startswith("GPU ")] if out.returncode == 0 else []
    )


def probe_gpu() -> GpuProbe:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip().lower() in _HIDDEN:
        return GpuProbe(False, "CUDA_VISIBLE_DEVICES", f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU")
    torch_says = _torch_cuda()
    if torch_says is not None and torch_says[0]:
        return GpuProbe(True, "torch", torch_says[1])
    nodes = _dev_nodes()
    if nodes:
        note = f"; {torch_says[1]}" if torch_says else ""
        return GpuProbe(True, "/dev/nvidia*", f"device nodes {', '.join(nodes)}{note}")
    listed = _nvidia_smi()
    if listed:
        return GpuProbe(True, "nvidia-smi", listed[0])
    return GpuProbe(
        False, "none", torch_says[1] if torch_says else "no torch, no /dev/nvidia*, no nvidia-smi GPU"
    )


@dataclass(frozen=True)
class DeviceChoice:
    requested: str  # the setting as given: auto | cuda | cuda:N | cpu
    kind: str  # cuda | cpu
    index: int
    gpu: GpuProbe

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.index}" if self.is_cuda else "cpu"

    def describe(self) -> dict:
        return {"requested": self.requested, "device": self.torch_device, "gpu_probe": asdict(self.gpu)}


def parse_device_setting(value: str | None) -> tuple[str, int]:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> (kind, index); anything else is a ValueError."""
    text = (value or "auto").strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return text, 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return "cuda", int(text[5:])
    raise ValueError(f"{DEVICE_ENV}={value!r} is not a device; use auto, cuda, cuda:N or cpu")


def resolve_device(setting: str | None = None, probe: GpuProbe | None = None) -> DeviceChoice:
    """Apply the policy to ``setting`` (default: ``$FACEREC_DEVICE``, else ``auto``)."""
    if setting is None:
        setting = os.environ.get(DEVICE_ENV, "auto")
    kind, index = parse_device_setting(setting)
    probe = probe or probe_gpu()
    if kind == "cpu":
        return DeviceChoice(setting, "cpu", 0, probe)
    if kind == "auto":
        return DeviceChoice(setting, "cuda" if probe.present else "cpu", 0, probe)
    if not probe.present:
        raise DeviceUnavailableError(
            f"{DEVICE_ENV}={setting} requires a GPU, but none was found ({probe.detail}). "
            f"Check the NVIDIA driver (nvidia-smi) and, in a container, that it was started with GPU "
            f"access (--gpus all); or set {DEVICE_ENV}=cpu (or auto)."
        )
    return DeviceChoice(setting, "cuda", index, probe)


def _why_gpu(choice: DeviceChoice) -> str:
    if choice.requested.strip().lower() == "auto":
        return f"{DEVICE_ENV}=auto and this machine has a GPU ({choice.gpu.detail}), so the GPU is required"
    return f"{DEVICE_ENV}={choice.requested} requires the GPU"


_ORT_GPU_HINT = (
    "Install the GPU build instead of the CPU one (they must not share an environment): "
    "`pip uninstall -y onnxruntime && pip install onnxruntime-gpu` (CUDA 12 + cuDNN 9 for current "
    "releases), or serve with the torch backend, or set FACEREC_DEVICE=cpu to use the CPU on purpose."
)


def ort_providers(
    choice: DeviceChoice,
    tensorrt: bool = False,
    cuda_options: dict | None = None,
    tensorrt_options: dict | None = None,
) -> list:
    """The provider list for ``onnxruntime.InferenceSession``; checks availability first.

    CPU stays last in a GPU list only because onnxruntime needs it for the few nodes a GPU provider
    does not take; :func:`verify_ort_session` then refuses a session whose first provider is the CPU.
    """
    import onnxruntime as ort

    if not choice.is_cuda:
        return [CPU_EP]
    available = ort.get_available_providers()
    wanted = [TENSORRT_EP, CUDA_EP] if tensorrt else [CUDA_EP]
    missing = [p for p in wanted if p not in available]
    if missing:
        raise DeviceUnavailableError(
            f"{_why_gpu(choice)}, but onnxruntime {ort.__version__} has no {' / '.join(missing)} "
            f"(available: {', '.join(available)}). {_ORT_GPU_HINT}"
        )
    providers: list = []
    if tensorrt:
        providers.append((TENSORRT_EP, {"device_id": choice.index, **(tensorrt_options or {})}))
    providers.append((CUDA_EP, {"device_id": choice.index, **(cuda_options or {})}))
    providers.append(CPU_EP)
    return providers


def verify_ort_session(session, choice: DeviceChoice, tensorrt: bool = False) -> str:
    """The active provider; raises if a GPU was required and the session fell back to the CPU.

    onnxruntime only logs an error and carries on with the CPU when the CUDA provider fails to load
    (missing libcudnn, driver too old), so the session's provider list is checked, not assumed.
    """
    active = list(session.get_providers())
    if not choice.is_cuda:
        return active[0]
    wanted = TENSORRT_EP if tensorrt else CUDA_EP
    if wanted not in active or active[0] == CPU_EP:
        raise DeviceUnavailableError(
            f"{_why_gpu(choice)}, but onnxruntime could not activate {wanted}: the session runs on "
            f"{', '.join(active)}. Usually the CUDA / cuDNN (or TensorRT) libraries it loads are "
            f"missing or of another major version; onnxruntime's log above names the library. "
            f"{_ORT_GPU_HINT}"
        )
    return active[0]


def require_torch_device(choice: DeviceChoice):
    """A ``torch.device`` for ``choice``; raises if a GPU is required and torch cannot use it."""
    import torch

    if not choice.is_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"{_why_gpu(choice)}, but torch {torch.__version__} cannot use it "
            f"(CUDA build: {torch.version.cuda or 'none, a CPU-only build'}). Install a CUDA build of "
            f"torch (https://pytorch.org/get-started/locally/), or set FACEREC_DEVICE=cpu."
        )
    if choice.index >= torch.cuda.device_count():
        raise DeviceUnavailableError(
            f"{DEVICE_ENV}={choice.requested}: only {torch.cuda.device_count()} GPU(s) are visible"
        )
    return torch.device(choice.torch_device)
