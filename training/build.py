"""What the trainer is built from, one named builder per part: the data, the checkpoints a run
starts from, the model, the head and loss, the distillation, the optimiser and the data stream with
its schedule (and the imprinting of class centres, run once at the start of a fresh run).

``Trainer.__init__`` (training/trainer.py) calls them in this order, which matters for determinism:
everything drawn from the global RNG before the per-rank reseed (backbone, distillation
projection) is the same on every rank.
"""

from __future__ import annotations

import copy
import inspect
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from facerec.data.datasets import EvalTransform
from facerec.losses import FaceRecognitionLoss
from training import checkpoint as ckpt
from training.config import Config
from training.data import CropThen, ResumableBatchSampler, build_dataset, build_loader, class_counts
from training.dist import DistInfo, allreduce_sum_hook, barrier
from training.distill import Distillation
from training.optim import autocast_dtype, build_optimizer, make_scaler
from training.schedule import build_scheduler

IMPRINT_MAX_BYTES = 2 * 2**30


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def set_deterministic(enabled: bool, device: torch.device) -> None:
    if enabled and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def is_cnn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


# ---------------------------------------------------------------------------- data
def build_data(cfg: Config):
    """The training dataset (``.num_classes`` set); loss.distill with images_without_identity keeps
    the identities too small for a class, as label -1."""
    distill = cfg.loss.distill
    return build_dataset(cfg.data, cfg.train.seed,
                         keep_small_identities=bool(distill and distill.images_without_identity))


# ---------------------------------------------------------------------------- checkpointing
def recover_checkpoints(ckpt_dir: Path, resume: str | None, info: DistInfo) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (None: a fresh run) and notes for the log. Rank 0 first
    finishes or undoes a checkpoint replacement a crash interrupted, and sets aside the checkpoints
    newer than the one resumed (an older step of this run), while the other ranks wait."""
    recovered: list[str] = []
    if info.is_main:
        recovered = ckpt.recover_checkpoints(ckpt_dir)
    barrier(info)
    resume_from = ckpt.resolve_resume(resume, ckpt_dir)
    if resume_from is not None and info.is_main:
        recovered += ckpt.set_aside_newer(ckpt_dir, resume_from)
    barrier(info)
    return resume_from, recovered


# ---------------------------------------------------------------------------- model
def load_backbone(model: nn.Module, source: str, name: str) -> str:
    """Copy the weights of ``source`` (a checkpoint folder, a trainer model.pt or a torch artefact)
    into ``model``; both must be the same architecture. Returns the file the weights came from."""
    from facerec.export.torch_artifact import load_model_file

    loaded = load_model_file(source)
    if loaded.name != name:
        raise ValueError(f"model.init_from={source} holds a {loaded.name!r} model, but model.name is {name!r}")
    try:
        model.load_state_dict(loaded.model.state_dict(), strict=True)
    except RuntimeError as err:
        raise ValueError(f"model.init_from={source}: its weights do not fit this {name!r} "
                         f"(different model.kwargs?): {str(err).splitlines()[0]} ...") from err
    return loaded.origin


def prepare_model(model: nn.Module, cfg: Config, info: DistInfo, fresh: bool
                  ) -> tuple[nn.Module, bool, str | None]:
    """``model`` initialised from model.init_from (a ``fresh`` run only: a resumed run has its own
    weights), with its memory options, on the device. Returns (model, channels_last, the file the
    initial weights came from or None)."""
    init_origin = None
    if cfg.model.init_from and fresh:
        init_origin = load_backbone(model, cfg.model.init_from, cfg.model.name)
    if cfg.model.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    if cfg.model.sync_bn and info.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    channels_last = cfg.model.channels_last
    if channels_last is None:
        channels_last = info.device.type == "cuda" and is_cnn(model)
    model = model.to(info.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, channels_last, init_origin


def wrap_model(model: nn.Module, cfg: Config, info: DistInfo) -> nn.Module:
    """The module the training step calls: DDP with summed gradients, then torch.compile."""
    if info.distributed:
        # The loss module is NOT wrapped: its centres are sharded, not replicated.
        # BN statistics stay per rank (no buffer sync in forward); torch >= 2.14 renamed the flag
        params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
                   else {"broadcast_buffers": False})
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            gradient_as_bucket_view=True, find_unused_parameters=cfg.model.find_unused_parameters,
            **no_sync,
        )
        model.register_comm_hook(None, allreduce_sum_hook)
    if cfg.model.compile:
        model = torch.compile(model)
    return model


# ---------------------------------------------------------------------------- head and loss
def init_centres(loss_fn: FaceRecognitionLoss, seed: int, std: float = 0.01) -> None:
    """Draw all C centres from one seeded generator and keep this rank's rows, so the initial
    weights do not depend on how many processes the run has."""
    centres = loss_fn.centres
    g = torch.Generator().manual_seed(seed + 104729)
    with torch.no_grad():
        full = torch.randn(centres.num_classes, centres.embedding_size, generator=g) * std
        centres.weight.copy_(full[centres.class_start : centres.class_end])


def build_loss(cfg: Config, num_classes: int, model: nn.Module, dataset, device: torch.device
               ) -> tuple[FaceRecognitionLoss, int]:
    """Class centres + margin + UNPG + FIQA, on the device. Returns (loss, the number of classes
    with fewer than loss.quality_min_images images, which take no part in the quality target)."""
    lc = cfg.loss
    loss_fn = FaceRecognitionLoss(
        num_classes, model.embedding_size, margin=lc.margin, margin_kwargs=lc.margin_kwargs,
        sample_rate=lc.sample_rate, unpg=lc.unpg, unpg_whisker=lc.unpg_whisker,
        quality_weight=lc.quality_weight, quality_beta=lc.quality_beta, seed=cfg.train.seed,
    )
    init_centres(loss_fn, cfg.train.seed)
    excluded = 0
    if getattr(model, "has_quality", False) and lc.quality_min_images > 1:
        counts = class_counts(dataset)
        if counts is not None:
            loss_fn.set_quality_classes(counts >= lc.quality_min_images)
            excluded = int((counts < lc.quality_min_images).sum())
    return loss_fn.to(device), excluded


# ---------------------------------------------------------------------------- distillation
def build_distillation(cfg: Config, dataset, model: nn.Module, info: DistInfo) -> Distillation | None:
    """loss.distill: the teacher rows of every training image and the distillation terms."""
    if cfg.loss.distill is None:
        return None
    return Distillation(cfg.loss.distill, dataset, model.embedding_size, cfg.train.seed, info.device,
                        progress=cfg.train.progress and info.is_main)


# ---------------------------------------------------------------------------- optimiser and schedule
@dataclass
class Optimisation:
    optimizer: torch.optim.Optimizer
    centre_params: list[torch.Tensor]  # sharded over ranks: the loss module's class centres
    backbone_params: list[torch.Tensor]  # replicated (same on every rank, gradients summed)
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler


def build_optimisation(cfg: Config, model: nn.Module, loss_fn: FaceRecognitionLoss,
                       distill: Distillation | None, device: torch.device) -> Optimisation:
    distill_params = distill.params if distill else []
    optimizer = build_optimizer(model, loss_fn, cfg.optim, distill_params)
    centre_params = [p for p in loss_fn.parameters() if p.requires_grad]
    shard_ids = {id(p) for p in centre_params}
    # replicated parameters: backbone + projection
    backbone_params = [p for p in model.parameters() if p.requires_grad and id(p) not in shard_ids]
    backbone_params += distill_params
    amp_dtype = autocast_dtype(cfg.train.amp, device)
    return Optimisation(optimizer, centre_params, backbone_params, amp_dtype, make_scaler(amp_dtype, device))


@dataclass
class DataStream:
    sampler: ResumableBatchSampler
    loader: DataLoader
    total_steps: int
    scheduler: torch.optim.lr_scheduler.LRScheduler


def build_stream(cfg: Config, dataset, distill: Distillation | None, optimizer: torch.optim.Optimizer,
                 info: DistInfo) -> DataStream:
    """This rank's batches (resumable mid-epoch), the run's length in steps and the LR schedule."""
    sampler = ResumableBatchSampler(len(dataset), cfg.data.batch_size, info.rank, info.world_size, cfg.train.seed)
    loader = build_loader(distill.wrap(dataset) if distill else dataset, sampler, cfg.data,
                          info.device.type == "cuda")
    spe = sampler.steps_per_epoch
    total_steps = cfg.train.epochs * spe
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    return DataStream(sampler, loader, total_steps, build_scheduler(optimizer, cfg.schedule, total_steps, spe))


# ---------------------------------------------------------------------------- centre imprinting
def imprint_centres(model: nn.Module, loss_fn: FaceRecognitionLoss, dataset, cfg: Config, info: DistInfo,
                    amp_dtype: torch.dtype | None) -> str:
    """Each class centre <- the mean unit embedding of its training images under ``model`` (eval
    mode, no augmentation), at the norm of the random centres it replaces. Every rank embeds its
    share of the images and the sums are added over ranks. Returns the line for the log."""
    device, num_classes = info.device, int(dataset.num_classes)
    data = dataset
    if hasattr(data, "transform"):
        data = copy.copy(data)
        data.transform = CropThen(EvalTransform(), cfg.data.center_crop)
    share = Subset(data, range(info.rank, len(data), info.world_size))
    loader = DataLoader(share, batch_size=cfg.data.batch_size, num_workers=cfg.data.workers)
    centres = loss_fn.centres
    size = num_classes * centres.embedding_size * 4
    if size > IMPRINT_MAX_BYTES:
        raise ValueError(f"loss.centres_init=imprint needs a {size / 2**30:.1f} GiB (classes x embedding) "
                         f"buffer on every rank, more than {IMPRINT_MAX_BYTES / 2**30:.0f} GiB; use "
                         "centres_init=random for this many classes")
    sums = torch.zeros(num_classes, centres.embedding_size, device=device)
    was_training = model.training
    model.eval()
    show = cfg.train.progress and info.is_main
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for images, labels in tqdm(loader, desc="imprinting class centres", disable=not show):
            emb = model(images.to(device)).embedding.float()
            keep = labels.to(device) >= 0  # label -1 (images_without_identity): no class
            sums.index_add_(0, labels.to(device)[keep], nn.functional.normalize(emb[keep], dim=1))
    model.train(was_training)
    if info.distributed:
        dist.all_reduce(sums)
    local = sums[centres.class_start : centres.class_end]
    seen = local.norm(dim=1) > 0
    with torch.no_grad():
        w = centres.weight
        # the mean norm of ALL random centres (summed over shards), so the scale does not
        # depend on how many ranks share the classes
        norm = torch.stack([w.norm(dim=1).sum(), torch.tensor(float(w.shape[0]), device=w.device)])
        if info.distributed:
            dist.all_reduce(norm)
        scale = norm[0] / norm[1]
        w.copy_(torch.where(seen[:, None], nn.functional.normalize(local, dim=1) * scale, w))
    return (f"imprinted {int((sums.norm(dim=1) > 0).sum())} of {num_classes} class "
            f"centres from {len(data)} images")
