"""Typed training configuration: pydantic models loaded from YAML, plus command-line overrides.

A run is described by one YAML file (``training/configs/*.yaml``), optionally on top of a base
(``base: other.yaml``, resolved relative to the file), and ``--set section.key=value`` overrides
whose values are parsed as YAML (``--set optim.lr=0.05 --set loss.unpg=true``). Unknown keys are
errors, so a typo never silently trains the default. The *resolved* config is written next to
every checkpoint, so a checkpoint always says exactly how it was made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from facerec.data.degrade import RandomDegradation


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Strict):
    name: str = "mobilefacenet"
    kwargs: dict[str, Any] = Field(default_factory=dict)  # create_model overrides
    # Modules imported before the model is built, so plugins (or tests) can register backbones.
    imports: list[str] = Field(default_factory=list)
    channels_last: bool | None = None  # None: on for CNNs on CUDA
    compile: bool = False  # torch.compile the backbone (the loss has data-dependent shapes)
    grad_checkpointing: bool = False
    sync_bn: bool = False
    find_unused_parameters: bool = False  # DDP: needed only if some parameters get no gradient
    # Start from these backbone weights (fine-tuning): a checkpoint folder, a trainer model.pt or a
    # facerec torch artefact of the same model. Ignored when the run resumes from its own checkpoint.
    init_from: str | None = None


class DistillConfig(_Strict):
    """``loss.distill``: learn from a teacher's cached embeddings (``facerec teach``)."""

    cache: str  # a teacher cache folder (facerec teach --out)
    # relational: match the student's in-batch cosine matrix to the teacher's (0: off)
    relational_weight: float = Field(1.0, ge=0.0)
    relational_kind: Literal["kl", "mse"] = "kl"
    temperature: float = Field(0.1, gt=0.0)  # the student's row-softmax (kl)
    teacher_temperature: float | None = Field(None, gt=0.0)  # None: the student's
    # embedding: a learned projection student -> teacher space, cosine loss (0: off)
    embedding_weight: float = Field(0.0, ge=0.0)
    # Keep the images of identities with fewer than data.min_images_per_identity images, with label
    # -1: they feed only the distillation terms (no margin, UNPG or quality loss, no class).
    images_without_identity: bool = False

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if not self.cache:
            raise ValueError("loss.distill.cache: give the teacher cache folder (made by `facerec teach`)")
        if self.relational_weight == 0 and self.embedding_weight == 0:
            raise ValueError("loss.distill: relational_weight and embedding_weight are both 0, so there is "
                             "nothing to distil; set one above 0, or loss.distill=null to train without a teacher")
        return self


class LossConfig(_Strict):
    margin: str = "arcface"
    margin_kwargs: dict[str, Any] = Field(default_factory=dict)
    sample_rate: float = 1.0  # Partial FC
    unpg: bool = False
    unpg_whisker: float = 1.5
    quality_weight: float = 10.0
    quality_beta: float = 0.5
    # Identities with fewer images than this train the classifier but not the quality target:
    # with one image the class centre is that image, so its certainty ratio says nothing.
    quality_min_images: int = 2
    # random: N(0, 0.01) centres. imprint: each class centre starts at the mean unit embedding of
    # its training images under the initial backbone (for fine-tuning from model.init_from).
    centres_init: Literal["random", "imprint"] = "random"
    distill: DistillConfig | None = None  # None: no teacher


class OptimConfig(_Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 5e-4
    fused: bool | None = None  # None: fused when this torch supports it on the device
    clip_grad_norm: float | None = 5.0  # None or 0: no clipping


class ScheduleConfig(_Strict):
    kind: Literal["poly", "cosine", "constant"] = "poly"
    warmup_steps: int = 0
    warmup_epochs: float = 0.0  # added to warmup_steps once the epoch length is known
    power: float = 2.0  # poly decay exponent
    min_lr_ratio: float = 0.0  # floor as a fraction of the peak lr


class DataConfig(_Strict):
    # synthetic: generated images (tests, smoke runs); folder: <root>/<identity>/<image>;
    # rec: insightface train.rec; pool: the shared-data training pool of the protocol.
    kind: Literal["synthetic", "folder", "rec", "pool"] = "synthetic"
    path: str | None = None  # folder/.rec path; data root for 'pool' (default FACEREC_DATA)
    manifest: str | None = None  # folder: manifest.csv to use (default <path>/manifest.csv if present)
    pool_sources: list[str] = Field(default_factory=lambda: ["lfw", "celeba", "celeba10k", "yaleb", "orl", "yale"])
    pins: str | None = None  # 'pool' with "pins" in pool_sources: the Pins folder (or $FACEREC_PINS)
    identity_range: tuple[int, int] | None = None  # [start, end) of sorted identities to train on
    min_images_per_identity: int = 1
    # A text file of images to leave out (one per line, as the dataset names them: relative to a
    # folder dataset's root; blank lines and '#' comments ignored), e.g. `facerec clean`'s
    # exclude.txt of wrong-person images. Applied before the identity selection.
    exclude: str | None = None
    batch_size: int = 128  # per process
    workers: int = 4
    prefetch_factor: int = 2
    flip: bool = True
    photometric: float = 0.0
    # Image damage (blur, resampling, noise, low light, occlusion, JPEG) on part of the training
    # crops, so the quality token learns that damaged faces are worse (facerec/data/degrade.py;
    # `{}` takes its defaults: half the images, each kind about equally often).
    degrade: RandomDegradation | None = None
    center_crop: int | None = None  # crop of unaligned images (e.g. 150 for 250x250 LFW) before resize
    # synthetic data
    num_classes: int = 16
    images_per_class: int = 8
    noise: float = 0.35


class ValidationConfig(_Strict):
    # lfw_fold: the protocol's validation pairs (LFW fold 5); bin: an insightface .bin;
    # folder_pairs: all pairs over an identity-folder range; synthetic: pairs of synthetic identities.
    kind: Literal["none", "lfw_fold", "bin", "folder_pairs", "synthetic"] = "none"
    path: str | None = None  # .bin file, image folder, or the LFW image root (aligned or not)
    data_root: str | None = None  # for lfw_fold: where lfw/pairs.txt lives (default FACEREC_DATA)
    identity_range: tuple[int, int] | None = None
    max_pairs: int = 20000
    center_crop: int | None = None
    every_steps: int = 0  # 0: at the end of every epoch only
    flip: bool = True  # add the embedding of the mirrored image
    batch_size: int = 128
    folds: int = 10
    fars: list[float] = Field(default_factory=lambda: [1e-2, 1e-3])
    metric: str = "accuracy"  # a key of VerificationResult.as_dict(), e.g. 'tar@far=0.01'
    patience: int = 0  # stop after this many validations without improvement (0: never)


class TrainConfig(_Strict):
    epochs: int = 20
    max_steps: int | None = None  # stop earlier than epochs (counts optimiser steps)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 on CUDA GPUs with native bf16 (Ampere+), fp16 with a GradScaler on older CUDA
    # GPUs (emulated bf16 is slow), off on the CPU
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    seed: int = 0
    deterministic: bool = False
    log_every: int = 50
    # steps; checkpoints are also written whenever validation improves and at the end of the run
    # (not at every epoch end), one per step at most
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2  # plus the best-on-validation one
    # Stop after this many consecutive skipped non-finite steps (loss or global grad norm; under
    # fp16 a GradScaler overflow counts only once the scale is below 1). A skipped step leaves
    # the weights and optimiser untouched but NOT the BatchNorm running statistics, which the
    # forward pass already updated (no rollback). 0: never stop.
    nan_patience: int = 5
    # Warn when more than this fraction of a logged batch's different-identity pairs have
    # cosine > 0.9 (embedding collapse; logged as collapsed_pairs). 0: never warn.
    collapse_warn: float = Field(0.05, ge=0.0, le=1.0)
    progress: bool = True


    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        # YAML 1.1 reads a bare `off` (in a file or `--set train.amp=off`) as the boolean false
        return "off" if value is False else value

class Config(_Strict):
    run_dir: str = "runs/default"
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    val: ValidationConfig = Field(default_factory=ValidationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.data.batch_size < 1:
            raise ValueError("data.batch_size must be >= 1")
        if self.data.kind in ("folder", "rec") and not self.data.path:
            raise ValueError(f"data.path is required for data.kind={self.data.kind!r}")
        if self.loss.centres_init == "imprint" and not self.model.init_from:
            raise ValueError("loss.centres_init=imprint needs model.init_from: an untrained backbone "
                             "embeds every image alike, so its class means are no starting point")
        distill = self.loss.distill
        if distill is not None and self.data.kind == "synthetic":
            raise ValueError("loss.distill needs image files (data.kind folder, pool or rec): the teacher cache "
                             "is keyed by the bytes of each training image, and synthetic images have none")
        if distill is not None and distill.images_without_identity and self.data.kind == "rec":
            raise ValueError("loss.distill.images_without_identity applies to data.kind folder or pool (identities "
                             "below data.min_images_per_identity); a .rec keeps all its identities")
        if self.data.exclude and self.data.kind not in ("folder", "pool"):
            raise ValueError(f"data.exclude applies to data.kind folder or pool (image files), not {self.data.kind!r}")
        _check_registered(self.model, self.loss.margin)
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _check_registered(model: ModelConfig, margin: str) -> None:
    """model.name and loss.margin must be registered names (after importing model.imports, whose
    plugins may register more), so a misspelt name fails when the config loads, not after the
    dataset has been scanned."""
    import importlib

    from facerec.heads import list_margins
    from facerec.models import list_models, trainable_models
    from facerec.registry import unknown_name

    for module in model.imports:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"model.imports: cannot import {module!r} ({err})") from None
    if model.name not in list_models():
        raise ValueError(f"model.name: {unknown_name('model', model.name, list_models())}")
    if model.name not in trainable_models():
        raise ValueError(f"model.name: {model.name!r} serves imported weights on its own crop and is not "
                         f"trained here; train one of {', '.join(trainable_models())}")
    if margin not in list_margins():
        raise ValueError(f"loss.margin: {unknown_name('margin', margin, list_margins())}")


# Fields a resumed run may change without changing what it computes: where and how often it
# reports, how many loader workers feed it (the data stream is a function of seed and position
# only), when it gives up on non-finite steps, and init_from (ignored on resume). Everything
# else (model, loss, optimiser, schedule, data, validation, epochs/max_steps, seed, device,
# amp, determinism) must match the checkpoint's stored config.
RESUME_SAFE_FIELDS = (
    "run_dir", "model.init_from", "data.workers", "data.prefetch_factor", "train.progress",
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.nan_patience",
    "train.collapse_warn",
)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(stored: Config, new: Config, ignore=RESUME_SAFE_FIELDS) -> list[tuple[str, Any, Any]]:
    """(dotted key, stored value, new value) for every leaf that differs, except ``ignore``d ones
    (a dotted key or a section prefix)."""
    a, b = _flatten(stored.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))

    def skip(key: str) -> bool:
        return any(key == i or key.startswith(i + ".") for i in ignore)

    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not skip(k)]


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml_tree(path: str | Path) -> dict:
    """A YAML file with its ``base:`` chain merged underneath (bases resolved beside the file)."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    base = data.pop("base", None)
    if base:
        data = _deep_merge(load_yaml_tree(path.parent / base), data)
    return data


def apply_override(tree: dict, assignment: str) -> dict:
    """``'optim.lr=0.05'`` -> tree with that leaf set; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} is not key=value")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {assignment!r}: {part!r} is not a section")
    node[parts[-1]] = value
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    tree = load_yaml_tree(path) if path else {}
    for assignment in overrides:
        tree = apply_override(tree, assignment)
    return Config.model_validate(tree)


def save_config(config: Config, path: str | Path) -> None:
    from training.checkpoint import atomic_write_bytes

    atomic_write_bytes(Path(path), config.to_yaml().encode())
