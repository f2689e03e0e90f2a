"""The training loop: backbone + FaceRecognitionLoss (+ loss.distill: training/distill.py), AMP, DDP
with summed gradients, resume.

Hot-path rules: the step never waits for the device. Losses and the non-finite guard accumulate
in device tensors and are read once every ``log_every`` steps; a non-finite step is skipped on
the device through the fused optimiser's ``found_inf`` (or the GradScaler for fp16).

What a skipped step does NOT undo: the forward pass already ran in train mode, so BatchNorm
running statistics have absorbed the bad batch (possibly NaN) and the scheduler has advanced. There
is no rollback; a run whose BN buffers went non-finite keeps producing non-finite losses and is
stopped by ``train.nan_patience`` (resume from the last good checkpoint).

What the trainer is built from (data, checkpoints to resume, model, loss, distillation, optimiser,
data stream and schedule) comes from the named builders of ``training/build.py``.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from facerec.eval.spread import COLLAPSE_COSINE, pair_collapse
from facerec.models import create_model
from training import checkpoint as ckpt
from training.build import (
    build_data,
    build_distillation,
    build_loss,
    build_optimisation,
    build_stream,
    imprint_centres,
    prepare_model,
    recover_checkpoints,
    seed_everything,
    set_deterministic,
    wrap_model,
)
from training.config import Config, save_config
from training.dist import DistInfo, barrier, init_distributed
from training.distill import load_distill_state
from training.logger import RunLogger
from training.optim import clip_grad_norm, is_fused
from training.validation import build_pairset, validate

# fp16: a GradScaler overflow is normal back-off while the scale is at least this; below it the
# gradient is non-finite at any scale, so the step counts toward train.nan_patience.
FP16_OVERFLOW_SCALE = 1.0


class NonFiniteError(RuntimeError):
    pass


class Trainer:
    """``callbacks``: callables run with the trainer after every optimiser step, once the step's
    logging, validation and checkpoint are done (the crash tests kill the process from one)."""

    def __init__(self, config: Config, resume: str | None = None, info: DistInfo | None = None,
                 callbacks: Sequence[Callable[[Trainer], None]] = ()):
        self.cfg = cfg = config
        self.info = info or init_distributed(cfg.train.device)
        self.device = self.info.device
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.callbacks = list(callbacks)
        set_deterministic(cfg.train.deterministic, self.device)
        for module in cfg.model.imports:
            importlib.import_module(module)

        seed_everything(cfg.train.seed)  # same backbone init on every rank
        self.dataset = build_data(cfg)
        self.num_classes = int(self.dataset.num_classes)
        model = create_model(cfg.model.name, **cfg.model.kwargs)
        resume_from, recovered = recover_checkpoints(self.ckpt_dir, resume, self.info)
        model, self.channels_last, self.init_origin = prepare_model(model, cfg, self.info, resume_from is None)
        self.raw_model = model
        self.has_quality = bool(getattr(model, "has_quality", False))
        self.loss_fn, self.quality_excluded_classes = build_loss(cfg, self.num_classes, model, self.dataset,
                                                                 self.device)
        self.distill = build_distillation(cfg, self.dataset, model, self.info)
        opt = build_optimisation(cfg, model, self.loss_fn, self.distill, self.device)
        self.optimizer, self.scaler, self.amp_dtype = opt.optimizer, opt.scaler, opt.amp_dtype
        self.centre_params, self.backbone_params = opt.centre_params, opt.backbone_params
        self.model = wrap_model(model, cfg, self.info)
        seed_everything(cfg.train.seed + 1000 * self.info.rank)  # per-rank dropout / masking
        stream = build_stream(cfg, self.dataset, self.distill, self.optimizer, self.info)
        self.sampler, self.loader, self.scheduler = stream.sampler, stream.loader, stream.scheduler
        self.total_steps = stream.total_steps
        self.pairs = build_pairset(cfg.val, cfg.data, cfg.train.seed) if self.info.is_main else None

        self.step = self.epoch = self.step_in_epoch = 0
        self.best: float | None = None
        self.best_step: int | None = None  # rank 0: the step whose checkpoint holds self.best
        self._saved_at: tuple[int, int, int] | None = None  # (step, epoch, step_in_epoch) last saved
        self.validations_since_best = 0
        self.stop_reason: str | None = None
        self.validated_step = -1  # the step of the last validation (run_validation)
        self._reset_meters()
        if resume_from is not None:
            self.load(resume_from)
        self.log = RunLogger(self.run_dir, self.info.is_main, self.total_steps, self.step, cfg.train.progress,
                             resume_step=self.step if resume_from is not None else None)
        if self.info.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
            self._announce(resume_from, recovered)
        if resume_from is None and cfg.loss.centres_init == "imprint":
            self.imprint_centres()

    def imprint_centres(self) -> None:
        """Class centres <- mean unit embeddings of their images (``training.build.imprint_centres``)."""
        line = imprint_centres(self.raw_model, self.loss_fn, self.dataset, self.cfg, self.info, self.amp_dtype)
        if self.info.is_main:
            self.log.message(line)

    def _announce(self, resume_from: Path | None, recovered: list[str]) -> None:
        """Rank 0: how the run starts, in the log."""
        for note in recovered:
            self.log.message(f"checkpoints: {note}")
        if resume_from is not None:
            self.log.message(f"resumed from {resume_from} at step {self.step} (epoch {self.epoch})")
        elif self.init_origin:
            self.log.message(f"backbone initialised from {self.init_origin}")
        skipped = getattr(self.dataset, "protocol_check_skipped", None)
        if skipped:
            self.log.message(f"warning: {skipped}")
        if self.quality_excluded_classes:
            self.log.message(f"{self.quality_excluded_classes} of {self.num_classes} identities have fewer "
                             f"than {self.cfg.loss.quality_min_images} images: they train the classifier "
                             "but not the quality target")
        for line in self.distill.messages(self.cfg.data.min_images_per_identity) if self.distill else []:
            self.log.message(line)

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
                    for callback in self.callbacks:
                        callback(self)
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
