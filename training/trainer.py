"""The training loop: backbone + FaceRecognitionLoss (+ loss.distill: training/distill.py), AMP, DDP
with summed gradients, resume.

Hot-path rules: the step never waits for the device. Losses and the non-finite guard accumulate
in device tensors and are read once every ``log_every`` steps; a non-finite step is skipped on
the device through the fused optimiser's ``found_inf`` (or the GradScaler for fp16).

What a skipped step does NOT undo: the forward pass already ran in train mode, so BatchNorm
running statistics have absorbed the bad batch (possibly NaN) and the scheduler has advanced. There
is no rollback; a run whose BN buffers went non-finite keeps producing non-finite losses and is
stopped by ``train.nan_patience`` (resume from the last good checkpoint).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from facerec.data.datasets import EvalTransform
from facerec.eval.spread import COLLAPSE_COSINE, pair_collapse
from facerec.losses import FaceRecognitionLoss
from facerec.models import create_model
from training import checkpoint as ckpt
from training.config import Config, save_config
from training.data import (
    CropThen,
    ResumableBatchSampler,
    build_dataset,
    build_loader,
    class_counts,
)
from training.dist import DistInfo, allreduce_sum_hook, barrier, init_distributed
from training.distill import Distillation, load_distill_state
from training.logger import RunLogger
from training.optim import (
    autocast_dtype,
    build_optimizer,
    clip_grad_norm,
    is_fused,
    make_scaler,
)
from training.schedule import build_scheduler
from training.validation import build_pairset, validate

KILL_AT_STEP_ENV = "FACEREC_TEST_KILL_AT_STEP"  # test-only: SIGKILL right after this step
# fp16: a GradScaler overflow is normal back-off while the scale is at least this; below it the
# gradient is non-finite at any scale, so the step counts toward train.nan_patience.
FP16_OVERFLOW_SCALE = 1.0


class NonFiniteError(RuntimeError):
    pass


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


def init_centres(loss_fn: FaceRecognitionLoss, seed: int, std: float = 0.01) -> None:
    """Draw all C centres from one seeded generator and keep this rank's rows, so the initial
    weights do not depend on how many processes the run has."""
    centres = loss_fn.centres
    g = torch.Generator().manual_seed(seed + 104729)
    with torch.no_grad():
        full = torch.randn(centres.num_classes, centres.embedding_size, generator=g) * std
        centres.weight.copy_(full[centres.class_start : centres.class_end])


IMPRINT_MAX_BYTES = 2 * 2**30


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


class Trainer:
    def __init__(self, config: Config, resume: str | None = None, info: DistInfo | None = None):
        self.cfg = cfg = config
        self.info = info or init_distributed(cfg.train.device)
        self.device = self.info.device
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        set_deterministic(cfg.train.deterministic, self.device)
        for module in cfg.model.imports:
            importlib.import_module(module)

        seed_everything(cfg.train.seed)  # same backbone init on every rank
        distill_cfg = cfg.loss.distill
        self.dataset = build_dataset(cfg.data, cfg.train.seed,
                                     keep_small_identities=bool(distill_cfg and distill_cfg.images_without_identity))
        self.num_classes = int(self.dataset.num_classes)
        model = create_model(cfg.model.name, **cfg.model.kwargs)
        recovered: list[str] = []
        if self.info.is_main:  # finish or undo a checkpoint replacement a crash interrupted
            recovered = ckpt.recover_checkpoints(self.ckpt_dir)
        barrier(self.info)
        resume_from = ckpt.resolve_resume(resume, self.ckpt_dir)
        if resume_from is not None and self.info.is_main:  # an older step of this run: later ones go aside
            recovered += ckpt.set_aside_newer(self.ckpt_dir, resume_from)
        barrier(self.info)
        self.init_origin = None
        if cfg.model.init_from and resume_from is None:  # a resumed run has its own weights
            self.init_origin = load_backbone(model, cfg.model.init_from, cfg.model.name)
        if cfg.model.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(True)
        if cfg.model.sync_bn and self.info.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.channels_last = cfg.model.channels_last
        if self.channels_last is None:
            self.channels_last = self.device.type == "cuda" and is_cnn(model)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.raw_model = model
        self.has_quality = bool(getattr(model, "has_quality", False))
        lc = cfg.loss
        self.loss_fn = FaceRecognitionLoss(
            self.num_classes, model.embedding_size, margin=lc.margin, margin_kwargs=lc.margin_kwargs,
            sample_rate=lc.sample_rate, unpg=lc.unpg, unpg_whisker=lc.unpg_whisker,
            quality_weight=lc.quality_weight, quality_beta=lc.quality_beta, seed=cfg.train.seed,
        )
        init_centres(self.loss_fn, cfg.train.seed)
        if self.has_quality and lc.quality_min_images > 1:
            counts = class_counts(self.dataset)
            if counts is not None:
                self.loss_fn.set_quality_classes(counts >= lc.quality_min_images)
                self.quality_excluded_classes = int((counts < lc.quality_min_images).sum())
        self.loss_fn.to(self.device)
        self.distill = None  # loss.distill: teacher rows of every training image + the terms
        if distill_cfg is not None:
            self.distill = Distillation(distill_cfg, self.dataset, model.embedding_size, cfg.train.seed,
                                        self.device, progress=cfg.train.progress and self.info.is_main)
        distill_params = self.distill.params if self.distill else []
        self.optimizer = build_optimizer(model, self.loss_fn, cfg.optim, distill_params)
        self.centre_params = [p for p in self.loss_fn.parameters() if p.requires_grad]
        shard_ids = {id(p) for p in self.centre_params}
        # replicated parameters (same on every rank, gradients summed): backbone + projection
        self.backbone_params = [p for p in model.parameters() if p.requires_grad and id(p) not in shard_ids]
        self.backbone_params += distill_params
        self.amp_dtype = autocast_dtype(cfg.train.amp, self.device)
        self.scaler = make_scaler(self.amp_dtype, self.device)

        self.model = model
        if self.info.distributed:
            # The loss module is NOT wrapped: its centres are sharded, not replicated.
            # BN statistics stay per rank (no buffer sync in forward); torch >= 2.14 renamed the flag
            params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
                       else {"broadcast_buffers": False})
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True, find_unused_parameters=cfg.model.find_unused_parameters,
                **no_sync,
            )
            self.model.register_comm_hook(None, allreduce_sum_hook)
        if cfg.model.compile:
            self.model = torch.compile(self.model)
        seed_everything(cfg.train.seed + 1000 * self.info.rank)  # per-rank dropout / masking

        self.sampler = ResumableBatchSampler(len(self.dataset), cfg.data.batch_size, self.info.rank,
                                             self.info.world_size, cfg.train.seed)
        self.loader = build_loader(self.distill.wrap(self.dataset) if self.distill else self.dataset,
                                   self.sampler, cfg.data, self.device.type == "cuda")
        spe = self.sampler.steps_per_epoch
        self.total_steps = cfg.train.epochs * spe
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.total_steps, spe)
        self.pairs = build_pairset(cfg.val, cfg.data, cfg.train.seed) if self.info.is_main else None

        self.step = self.epoch = self.step_in_epoch = 0
        self.best: float | None = None
        self.best_step: int | None = None  # rank 0: the step whose checkpoint holds self.best
        self._saved_at: tuple[int, int, int] | None = None  # (step, epoch, step_in_epoch) last saved
        self.validations_since_best = 0
        self.stop_reason: str | None = None
        self.validated_step = -1  # the step of the last validation (run_validation)
        self._reset_meters()
        path = resume_from
        if path is not None:
            self.load(path)
        self.log = RunLogger(self.run_dir, self.info.is_main, self.total_steps, self.step, cfg.train.progress,
                             resume_step=self.step if path is not None else None)
        if self.info.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
            for note in recovered:
                self.log.message(f"checkpoints: {note}")
            if path is not None:
                self.log.message(f"resumed from {path} at step {self.step} (epoch {self.epoch})")
            elif self.init_origin:
                self.log.message(f"backbone initialised from {self.init_origin}")
            skipped = getattr(self.dataset, "protocol_check_skipped", None)
            if skipped:
                self.log.message(f"warning: {skipped}")
            excluded = getattr(self, "quality_excluded_classes", 0)
            if excluded:
                self.log.message(f"{excluded} of {self.num_classes} identities have fewer than "
                                 f"{cfg.loss.quality_min_images} images: they train the classifier "
                                 "but not the quality target")
            for line in self.distill.messages(cfg.data.min_images_per_identity) if self.distill else []:
                self.log.message(line)
        if path is None and cfg.loss.centres_init == "imprint":
            self.imprint_centres()

    def imprint_centres(self) -> None:
        """Each class centre <- the mean unit embedding of its training images under the current
        backbone (eval mode, no augmentation), at the norm of the random centres it replaces. Every
        rank embeds its share of the images and the sums are added over ranks."""
        data = self.dataset
        if hasattr(data, "transform"):
            data = copy.copy(data)
            data.transform = CropThen(EvalTransform(), self.cfg.data.center_crop)
        share = Subset(data, range(self.info.rank, len(data), self.info.world_size))
        loader = DataLoader(share, batch_size=self.cfg.data.batch_size, num_workers=self.cfg.data.workers)
        centres = self.loss_fn.centres
        size = self.num_classes * centres.embedding_size * 4
        if size > IMPRINT_MAX_BYTES:
            raise ValueError(f"loss.centres_init=imprint needs a {size / 2**30:.1f} GiB (classes x embedding) "
                             f"buffer on every rank, more than {IMPRINT_MAX_BYTES / 2**30:.0f} GiB; use "
                             "centres_init=random for this many classes")
        sums = torch.zeros(self.num_classes, centres.embedding_size, device=self.device)
        was_training = self.raw_model.training
        self.raw_model.eval()
        show = self.cfg.train.progress and self.info.is_main
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp_dtype,
                                             enabled=self.amp_dtype is not None):
            for images, labels in tqdm(loader, desc="imprinting class centres", disable=not show):
                emb = self.raw_model(images.to(self.device)).embedding.float()
                keep = labels.to(self.device) >= 0  # label -1 (images_without_identity): no class
                sums.index_add_(0, labels.to(self.device)[keep], nn.functional.normalize(emb[keep], dim=1))
        self.raw_model.train(was_training)
        if self.info.distributed:
            dist.all_reduce(sums)
        local = sums[centres.class_start : centres.class_end]
        seen = local.norm(dim=1) > 0
        with torch.no_grad():
            w = centres.weight
            # the mean norm of ALL random centres (summed over shards), so the scale does not
            # depend on how many ranks share the classes
            norm = torch.stack([w.norm(dim=1).sum(), torch.tensor(float(w.shape[0]), device=w.device)])
            if self.info.distributed:
                dist.all_reduce(norm)
            scale = norm[0] / norm[1]
            w.copy_(torch.where(seen[:, None], nn.functional.normalize(local, dim=1) * scale, w))
        if self.info.is_main:
            self.log.message(f"imprinted {int((sums.norm(dim=1) > 0).sum())} of {self.num_classes} class "
                             f"centres from {len(data)} images")

    # ------------------------------------------------------------------ state
    def _reset_meters(self) -> None:
        z = lambda: torch.zeros((), device=self.device)
        self.meters = {"loss": z(), "classification": z(), "quality": z(), "grad_norm": z(), "count": z()}
        self.meters.update({name: z() for name in (self.distill.terms.names if getattr(self, "distill", None) else [])})
        # The streak of consecutive bad steps carries over logging intervals; the rest restarts.
        if not hasattr(self, "bad_streak"):
            self.bad_streak = z()
        self.bad_max, self.bad_count = self.bad_streak.clone(), z()
        self.overflow_count = z()  # fp16: steps the GradScaler skipped for overflow (not "bad")
        self._meter_start = (time.perf_counter(), self.step)

    def rank_state(self) -> dict:
        distill = {"distill": self.distill.state_dict()} if self.distill else {}
        return {
            **distill,
            "loss": self.loss_fn.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "best": self.best, "validations_since_best": self.validations_since_best,
            "rng": ckpt.capture_rng(self.device),
        }

    def load(self, path: Path) -> None:
        model_state, state, meta = ckpt.load_checkpoint(path, self.info.rank, self.info.world_size)
        self.raw_model.load_state_dict(model_state["model"])
        self.loss_fn.load_state_dict(state["loss"])
        load_distill_state(self.distill, state, path)  # before the optimiser, whose groups it decides
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.best, self.validations_since_best = state["best"], state["validations_since_best"]
        best = meta.get("best") or ckpt.read_best(Path(path).parent)  # older checkpoints: best.json
        self.best_step = None
        if best and self.best is not None and best["step"] <= self.step:
            self.best_step = best["step"]
        self._saved_at = (self.step, self.epoch, self.step_in_epoch)
        ckpt.restore_rng(state["rng"], self.device)

    def save(self, metrics: dict | None = None) -> Path:
        model_state = None
        if self.info.is_main:
            model_state = {"model": self.raw_model.state_dict(), "model_name": self.cfg.model.name,
                           "model_kwargs": self.cfg.model.kwargs, "step": self.step, "epoch": self.epoch}
        meta = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "metrics": metrics or {}}
        best = None
        if self.info.is_main and self.best_step is not None:
            best = {"step": self.best_step, "metric": self.cfg.val.metric, "value": self.best}
        path = ckpt.save_checkpoint(
            self.ckpt_dir, self.step, self.info.rank, self.info.world_size, model_state,
            self.rank_state(), self.cfg.to_yaml(), meta, barrier=lambda: barrier(self.info),
            keep=self.cfg.train.keep_checkpoints, best=best,
        )
        self._saved_at = (self.step, self.epoch, self.step_in_epoch)
        return path

    def saved_now(self) -> bool:
        """Whether the last checkpoint holds exactly this state (same step and epoch position)."""
        return self._saved_at == (self.step, self.epoch, self.step_in_epoch)

    # ------------------------------------------------------------------ step
    def _share_skip_decision(self, finite: torch.Tensor) -> None:
        """fp16: make the GradScaler skip (and back off) exactly when the guard says so.

        The scaler only sees this process's gradients, but the class centres are sharded: an inf in
        one rank's shard would skip the step there and apply it elsewhere, and the replicas would
        diverge. ``finite`` comes from the global gradient norm (shards summed over ranks), so it
        is the same on every rank; it is folded into the scaler's per-device ``found_inf`` after
        ``unscale_`` (on the device, no host sync)."""
        states = getattr(self.scaler, "_per_optimizer_states", None)
        state = states.get(id(self.optimizer)) if states is not None else None
        found = state.get("found_inf_per_device") if state else None
        if not found:
            return
        skip = (~finite).float()
        for value in found.values():
            torch.maximum(value, skip.to(value.device).reshape(value.shape), out=value)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """One optimiser step, guarded against non-finite values without a host sync.

        The guard looks at the loss and at the global gradient norm, which is computed in every
        mode (with clipping off it is measured, not applied), so a NaN gradient behind a finite
        loss is caught too. A step with either non-finite is skipped (fused ``found_inf``, the
        GradScaler, or the foreach fallback's host check). Skipped steps counted as *bad* feed
        ``train.nan_patience``; under fp16 a GradScaler overflow with a finite loss is the
        scaler's normal back-off, counted apart (``overflow_steps``) and only treated as bad once
        the scale has fallen below ``FP16_OVERFLOW_SCALE``. A skipped step does not roll back
        BatchNorm running statistics (nor the scheduler): see the module docstring. ``index``: the
        batch's sample indices (loss.distill only), which pick the teacher rows.
        """
        clip = self.cfg.optim.clip_grad_norm
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = self.model(images)
            losses = self.loss_fn(out.embedding, labels, out.quality if self.has_quality else None)
            total, terms = losses.total, {}
            if self.distill is not None:
                distill_total, terms = self.distill.loss(out.embedding, index)
                total = total + distill_total
        self.scaler.scale(total).backward()
        if self.distill is not None:
            self.distill.sum_gradients()
        self.scaler.unscale_(self.optimizer)  # no-op without fp16; scaler.step would do it anyway
        # clipping off: the norm is only measured (max_norm None), for the guard and the log
        norm = clip_grad_norm(self.backbone_params, self.centre_params, clip or None)
        total = total.detach()
        loss_ok = torch.isfinite(total)
        finite = loss_ok & torch.isfinite(norm.to(total.device))
        if self.scaler.is_enabled():
            scale = getattr(self.scaler, "_scale", None)  # this step's scale, before update()
            bad = ~loss_ok
            if scale is not None:  # an overflow that survives a tiny scale is a real one
                bad = bad | (~finite & (scale.to(total.device) < FP16_OVERFLOW_SCALE).reshape(()))
            self._share_skip_decision(finite)
            self.scaler.step(self.optimizer)  # skips inf/NaN gradients itself
            self.scaler.update()
        else:
            bad = ~finite
            if is_fused(self.optimizer):
                self.optimizer.grad_scale = None
                self.optimizer.found_inf = (~finite).float()  # the fused kernel skips on the device
                self.optimizer.step()
            elif bool(finite):  # foreach fallback: this one does sync with the host
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        good, bad = finite.float(), bad.float()
        m = self.meters
        m["loss"] += torch.nan_to_num(total) * good
        m["classification"] += torch.nan_to_num(losses.classification.detach()) * good
        if losses.quality is not None:
            m["quality"] += torch.nan_to_num(losses.quality.detach()) * good
        m["grad_norm"] += torch.nan_to_num(norm.detach().float().to(total.device)) * good
        for name, value in terms.items():
            m[name] += torch.nan_to_num(value.detach()) * good
        m["count"] += good
        # applied step: the streak restarts; bad step: it grows; fp16 overflow: it stays
        self.bad_streak = (self.bad_streak + bad) * (1 - good)
        self.bad_max = torch.maximum(self.bad_max, self.bad_streak)
        self.bad_count += bad
        self.overflow_count += (1 - good) * (1 - bad)
        self.last_negatives = losses.num_negatives
        if (self.step + 1) % self.cfg.train.log_every == 0 or self.step + 1 >= self.total_steps:
            # Read at the next flush (no host sync here): the collapse monitor of this batch.
            self.last_collapse = pair_collapse(out.embedding, labels)

    def flush_meters(self) -> None:
        """The one host sync of a logging interval: read the meters, log, check the NaN guard."""
        collapse = getattr(self, "last_collapse", None)  # float32, on the device (pair_collapse)
        self.last_collapse = None
        names = [*self.meters, "bad_max", "bad_count", "overflow"]
        parts = [torch.stack([*self.meters.values(), self.bad_max, self.bad_count, self.overflow_count]).float()]
        if collapse is not None:
            parts.append(collapse)
        values = torch.cat(parts).tolist()
        read = dict(zip(names, values))
        loss, ce, q, gn, count = (read[k] for k in ("loss", "classification", "quality", "grad_norm", "count"))
        bad_max, bad_count, overflow = read["bad_max"], read["bad_count"], read["overflow"]
        collapse_values = values[len(names):]
        elapsed = time.perf_counter() - self._meter_start[0]
        steps = self.step - self._meter_start[1]
        n = max(count, 1.0)
        record = {"loss": loss / n, "classification": ce / n, "grad_norm": gn / n, "epoch": self.epoch,
                  "lr": self.optimizer.param_groups[0]["lr"], "skipped_steps": int(bad_count),
                  "img_s": steps * self.cfg.data.batch_size * self.info.world_size / max(elapsed, 1e-9),
                  "unpg_negatives": int(getattr(self, "last_negatives", 0))}
        if self.scaler.is_enabled():  # fp16: steps the GradScaler skipped for overflow
            record["overflow_steps"] = int(overflow)
        if self.has_quality:
            record["quality"] = q / n
        for name in self.distill.terms.names if self.distill else []:
            record[name] = read[name] / n
        if collapse is not None and all(math.isfinite(v) for v in collapse_values):
            record["pair_cos"], record["collapsed_pairs"] = collapse_values
            self._check_collapse(record["collapsed_pairs"])
        if self.device.type == "cuda":
            record["max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.log.log("train", self.step, record)
        if bad_count:
            self.log.message(step=self.step, text=f"step {self.step}: skipped {int(bad_count)} step(s) with a non-finite "
                             f"loss or gradient in the last {steps}")
        patience = self.cfg.train.nan_patience
        self._reset_meters()
        if patience and bad_max >= patience:
            raise NonFiniteError(
                f"stopping: {int(bad_max)} consecutive steps had a non-finite loss or gradient "
                f"(train.nan_patience={patience}) before step {self.step}. Lower optim.lr, enable "
                "gradient clipping, or use bf16 instead of fp16; the last good checkpoint is in "
                f"{self.ckpt_dir}")

    def _check_collapse(self, fraction: float) -> None:
        """Warn (once per episode) when many different-identity pairs of the batch point the same way."""
        limit = self.cfg.train.collapse_warn
        collapsing = bool(limit) and fraction > limit
        if collapsing and not getattr(self, "collapse_warned", False):
            self.log.message(
                step=self.step, text=f"step {self.step}: warning: {fraction:.0%} of the different-identity pairs in this "
                f"batch have cosine > {COLLAPSE_COSINE}: the embedding is collapsing (whole groups of "
                "classes merge onto one direction). ArcFace-type margins do this when the backbone "
                "cannot fit the data; see docs/training.md#embedding-collapse (a cosine-subtracting "
                "margin such as CosFace avoids it; a lower optim.lr only slows it; a smaller ArcFace "
                "margin makes it cheaper). train.collapse_warn sets this check.")
        self.collapse_warned = collapsing

    # ------------------------------------------------------------------ validation
    def run_validation(self) -> dict:
        """Validate on rank 0; returns the metrics (empty elsewhere). Updates best / early stopping."""
        metrics: dict = {}
        improved = stop = False
        self.validated_step = self.step
        if self.info.is_main and self.pairs is not None:
            result = validate(self.raw_model, self.pairs, self.cfg.val, self.device, self.amp_dtype,
                              self.channels_last)
            metrics = result.as_dict()
            name = self.cfg.val.metric
            if name not in metrics:
                raise KeyError(f"val.metric={name!r} is not among {sorted(metrics)}")
            value = metrics[name]
            improved = self.best is None or value > self.best
            if improved:
                self.best, self.validations_since_best = value, 0
            else:
                self.validations_since_best += 1
            patience = self.cfg.val.patience
            stop = bool(patience) and self.validations_since_best >= patience
            self.log.log("val", self.step, {**metrics, "best": self.best})
            self.log.message(step=self.step, text=f"step {self.step}: validation {result.kfold}, "
                             + ", ".join(str(t) for t in result.tar))
        if self.info.distributed:
            flags = torch.tensor([float(improved), float(stop)], device=self.device)
            dist.broadcast(flags, 0)
            improved, stop = bool(flags[0]), bool(flags[1])
        if improved:
            if self.info.is_main:
                self.best_step = self.step
            # best.json is written by save_checkpoint right after the commit, and the meta of the
            # checkpoint records this best step, so a crash in between cannot lose it
            self.save(metrics)
        if stop:
            self.stop_reason = f"early stopping: no better {self.cfg.val.metric} in {self.cfg.val.patience} validations"
        return metrics

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        cfg, epochs_total = self.cfg, self.cfg.train.epochs
        kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0") or 0)
        every_val = cfg.val.every_steps if cfg.val.kind != "none" else 0
        epoch_validation = cfg.val.kind != "none" and not every_val
        save_after_validation = False
        self.model.train()
        self.loss_fn.train()
        self._reset_meters()
        try:
            while self.step < self.total_steps and self.epoch < epochs_total and not self.stop_reason:
                self.sampler.set_epoch(self.epoch, self.step_in_epoch)
                for images, labels, *index in self.loader:  # index: loss.distill's sample indices
                    images = images.to(self.device, non_blocking=True)
                    if self.channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    labels = labels.to(self.device, non_blocking=True)
                    self.train_step(images, labels, *index)
                    self.step += 1
                    self.step_in_epoch += 1
                    self.log.advance()
                    last = self.step >= self.total_steps
                    if self.step % cfg.train.log_every == 0 or last:
                        self.flush_meters()
                    if every_val and self.step % every_val == 0:
                        self.run_validation()
                    if self.step % cfg.train.checkpoint_every == 0 and not last:
                        if epoch_validation and self.step_in_epoch >= self.sampler.steps_per_epoch:
                            save_after_validation = True  # validation may save this step below
                        elif not self.saved_now():  # not when validation just saved this state
                            self.save()
                    if self.step == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    if last or self.stop_reason:
                        break
                if self.step_in_epoch >= self.sampler.steps_per_epoch:
                    self.epoch += 1
                    self.step_in_epoch = 0
                    if epoch_validation:
                        self.run_validation()
                if save_after_validation and not self.saved_now():  # one checkpoint per step
                    self.save()
                save_after_validation = False
            if self.step != self._meter_start[1]:
                self.flush_meters()
            if epoch_validation and self.validated_step != self.step and not self.stop_reason:
                # a run that ends inside an epoch (train.max_steps) is still judged at its last step,
                # so its final weights can be the chosen checkpoint
                self.run_validation()
            if not ckpt.step_dir(self.ckpt_dir, self.step).exists():
                self.save()
            summary = {"step": self.step, "epoch": self.epoch, "best": self.best,
                       "stop_reason": self.stop_reason}
            self.log.message(f"done: {summary}")
        finally:
            self.log.close()
        return summary
