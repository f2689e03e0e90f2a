"""``facerec import backbone.pth --arch r50|vit_s``: an arcface_torch state dict -> a facerec model folder.

insightface's ``recognition/arcface_torch/backbones`` and :mod:`facerec.models` compute the same
functions with the same parameters; only some layers are named differently.

IResNet (``iresnet.py``; ``--arch r18|r34|r50|r100``):

=====================================  ==========================================
arcface_torch                          facerec ``iresnet*``
=====================================  ==========================================
``conv1`` / ``bn1`` / ``prelu``        ``stem.0`` / ``stem.1`` / ``stem.2``
``layer{k}.{i}.*`` (IBasicBlock)       ``stages.{k-1}.{i}.*`` (same block names)
``bn2``, ``fc``, ``features``          the same names
=====================================  ==========================================

Both blocks are BN-conv-BN-PReLU-conv(stride)-BN plus an identity or conv1x1-BN shortcut, every BN
has eps 1e-5, and the output layer is BN2d - dropout / flatten (their order does not matter in eval)
- FC(512*7*7 -> D) - BN1d.

ViT (``vit.py``, ``VisionTransformer`` with ``norm_layer="ln"``; ``--arch vit_t|vit_s|vit_b``):

========================================  =========================================================
arcface_torch                             facerec ``vit_t`` / ``vit_s`` / ``vit_b``
========================================  =========================================================
``patch_embed.proj``                      ``patch_embed`` (the same 9x9 stride-9 conv)
``feature.0`` / ``.1`` / ``.2`` / ``.3``  ``head.fc1`` / ``head.bn1`` / ``head.fc2`` / ``head.bn2``
``pos_embed``, ``mask_token``,            the same names (timm's ``Block`` names its
``blocks.{i}.*``, ``norm``                norms, attention and MLP as arcface_torch does)
========================================  =========================================================

Both are the same network: 12x12 patches of 9 px (the last 4 px rows and columns unseen), a learned
position embedding added to every patch token, no class token, pre-LN blocks (LayerNorm eps 1e-5,
qkv without bias, softmax(q k^T / sqrt(d_head)) v, biased projection, ReLU6 MLP of 4x width), a final
LayerNorm, then all 144 tokens flattened in token-major order into Linear(144*E -> E) - BN1d - Linear(E
-> D) - BN1d (eps 2e-5, no biases). The variants' widths and depths agree (vit_t 256 x 12, vit_s
512 x 12, vit_b 512 x 24, 8 heads). Token masking only acts in training, so the mask token is carried
but unused. facerec's ViT adds OOD feature taps (mean-pooled tokens) and pixel statistics as extra
outputs; neither has weights nor touches the embedding.

arcface_torch's ``fp16`` flag and its autocast regions only change the arithmetic of training; the
weights are fp32, so the import is exact in fp32.

The mapped state dict is loaded strictly (a key too many or too few, e.g. an r50 file with
``--arch r100`` or a ViT file with ``--arch vit_b``, is refused in one line), and the model is
exported by :func:`facerec.export.onnx.export_bundle` like any facerec model: parity-checked graphs,
the torch artefact, the insightface graph, and a contract (ArcFace 5-point alignment at 112, RGB,
(x - 127.5) / 127.5, as arcface_torch trains) whose version carries the source file's hash.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from facerec import bundle
from facerec.export.onnx import export_bundle
from facerec.export.torch_artifact import ModelSource, _strip_prefixes
from facerec.models import create_model


@dataclass(frozen=True)
class Family:
    """How one arcface_torch backbone family's keys become facerec's."""

    name: str
    renames: tuple
    embedding_key: str  # the facerec key of the last Linear: its rows are the embedding size
    source_embedding_key: str  # the same tensor's arcface_torch name, for messages


IRESNET = Family("IResNet", (
    (re.compile(r"^conv1\."), "stem.0."),
    (re.compile(r"^bn1\."), "stem.1."),
    (re.compile(r"^prelu\."), "stem.2."),
    (re.compile(r"^layer([1-4])\."), lambda m: f"stages.{int(m.group(1)) - 1}."),
), "fc.weight", "fc.weight")

_VIT_HEAD = ("fc1", "bn1", "fc2", "bn2")  # arcface_torch's ``feature`` Sequential, in order
VIT = Family("ViT", (
    (re.compile(r"^patch_embed\.proj\."), "patch_embed."),
    (re.compile(r"^feature\.([0-3])\."), lambda m: f"head.{_VIT_HEAD[int(m.group(1))]}."),
), "head.fc2.weight", "feature.2.weight")

# arcface_torch's ``--network`` names -> (facerec's registry name, family); layer counts and widths agree.
ARCHS = {
    "r18": ("iresnet18", IRESNET), "r34": ("iresnet34", IRESNET), "r50": ("iresnet50", IRESNET),
    "r100": ("iresnet100", IRESNET),
    "vit_t": ("vit_t", VIT), "vit_s": ("vit_s", VIT), "vit_b": ("vit_b", VIT),
}


class StateDictImportError(ValueError):
    """The state dict is not the arcface_torch model named by ``arch`` (one clear line)."""


def map_state_dict(state: dict[str, torch.Tensor], family: Family = IRESNET) -> dict[str, torch.Tensor]:
    """arcface_torch key names of ``family`` -> facerec key names (tensors unchanged)."""
    mapped = {}
    for key, value in state.items():
        new = _strip_prefixes(key)  # a DDP-wrapped backbone saves ``module.`` keys
        for pattern, repl in family.renames:
            new = pattern.sub(repl, new, count=1)
        mapped[new] = value
    return mapped


def _describe(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def build_from_state_dict(state: dict[str, torch.Tensor], arch: str) -> torch.nn.Module:
    """The facerec backbone holding an arcface_torch state dict, in eval mode, fp32."""
    if arch not in ARCHS:
        raise StateDictImportError(f"--arch {arch!r} is not supported; choose from {', '.join(ARCHS)}")
    name, family = ARCHS[arch]
    mapped = map_state_dict(state, family)
    last = mapped.get(family.embedding_key)
    if not isinstance(last, torch.Tensor) or last.ndim != 2:
        raise StateDictImportError(f"not an arcface_torch {family.name} state dict: "
                                   f"no 2-d '{family.source_embedding_key}'")
    model = create_model(name, embedding_size=int(last.shape[0]))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    if missing or unexpected:
        parts = [f"unexpected keys {_describe(unexpected)}" if unexpected else "",
                 f"missing keys {_describe(missing)}" if missing else ""]
        raise StateDictImportError(f"not an arcface_torch {arch} state dict: " + "; ".join(p for p in parts if p))
    wrong = [k for k in expected if tuple(mapped[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise StateDictImportError(f"not an arcface_torch {arch} state dict: shapes differ for {_describe(wrong)}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in mapped.items()}, strict=True)
    return model.float().eval()


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A ``backbone.pth`` (``torch.save(backbone.state_dict())``), loaded without running pickled code."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch's unpickling errors are long; said in one line
        raise StateDictImportError(f"{path}: not a torch state dict ({type(err).__name__})") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise StateDictImportError(f"{path}: not a state dict (a dict of tensors)")
    return data


def import_arcface_torch(src: str | Path, out_dir: str | Path, arch: str, *, name: str | None = None,
                         version: str | None = None, fp16: bool = True, **export_kw) -> dict:
    """Write the facerec model folder of the arcface_torch backbone ``src`` into ``out_dir``."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(2, "No such file", str(src))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    model = build_from_state_dict(load_state_dict(src), arch)
    source = ModelSource(model, ARCHS[arch][0], {"embedding_size": model.embedding_size},
                         version=version or f"arcface_torch-{arch}-{digest[:12]}",
                         origin=f"arcface_torch {arch}:{src.name}")
    report = export_bundle(source, out_dir, fp16=fp16, stem=name or src.stem, **export_kw)
    report["imported_from"] = {"file": src.name, "sha256": digest, "arch": arch, "layout": "arcface_torch"}
    (Path(out_dir) / bundle.EXPORT_REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report
