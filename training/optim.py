"""Optimiser, parameter groups and mixed-precision choices.

Weight decay is not applied to 1-D parameters (norm scales, biases, PReLU slopes) nor to the
tokens a model lists in ``no_weight_decay()``: decaying them only fights the normalisation.
Class centres keep weight decay, as in arcface_torch's recipe.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn


def param_groups(model: nn.Module, loss_fn: nn.Module, weight_decay: float,
                 extra: list[torch.Tensor] = ()) -> list[dict]:
    """Backbone (decayed / not), class centres and ``extra`` (the distillation projection: a
    replicated matrix, decayed like the backbone's); empty groups are left out."""
    skip_names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim <= 1 or name in skip_names or name.split(".")[0] in skip_names
        (no_decay if exempt else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "backbone"},
        {"params": no_decay, "weight_decay": 0.0, "name": "backbone_no_decay"},
        {"params": [p for p in loss_fn.parameters() if p.requires_grad],
         "weight_decay": weight_decay, "name": "centres"},
        {"params": list(extra), "weight_decay": weight_decay, "name": "distill_projection"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, loss_fn: nn.Module, cfg, extra: list[torch.Tensor] = ()) -> torch.optim.Optimizer:
    """SGD or AdamW over backbone + class centres (+ ``extra``); fused kernels when this torch has them.

    A fused optimiser also lets the trainer skip a non-finite step on the device (``found_inf``),
    without a host sync; the fallback (foreach) has to ask the host.
    """
    groups = param_groups(model, loss_fn, cfg.weight_decay, extra)
    if cfg.name == "sgd":
        cls, kwargs = torch.optim.SGD, dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    else:
        cls, kwargs = torch.optim.AdamW, dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    optimizer = None
    if cfg.fused is not False:
        try:
            optimizer = cls(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            if cfg.fused:  # asked for explicitly: do not fall back silently
                raise
    if optimizer is None:
        optimizer = cls(groups, foreach=True, **kwargs)
    if cfg.name == "sgd" and cfg.momentum > 0:
        # Fused SGD allocates momentum buffers uninitialised on its first step and fills them in the
        # kernel; if that step is skipped (found_inf) they would stay garbage. Zeros give the same
        # first update (buf = 0 * momentum + grad) and make a skipped first step harmless.
        for group in optimizer.param_groups:
            for p in group["params"]:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(optimizer.defaults.get("fused"))


def native_bf16(device: torch.device) -> bool:
    """Whether the CUDA device computes bf16 natively (Ampere and later).

    ``torch.cuda.is_bf16_supported()`` also counts emulated bf16 (V100, T4: slower than fp32 for
    matmuls) unless asked ``including_emulation=False``, which newer torch versions accept; older
    ones only answer True for native support, which the compute capability confirms.
    """
    check = torch.cuda.is_bf16_supported
    try:
        if "including_emulation" in inspect.signature(check).parameters:
            return bool(check(including_emulation=False))
    except (TypeError, ValueError):  # no signature to inspect
        pass
    if not check():
        return False
    if getattr(torch.version, "hip", None):
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """None = full precision. 'auto': bf16 on CUDA devices with native bf16, fp16 (with a
    GradScaler, see :func:`make_scaler`) on older CUDA GPUs, off on the CPU."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if native_bf16(device) else torch.float16
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def make_scaler(dtype: torch.dtype | None, device: torch.device):
    """A GradScaler for fp16 only; bf16 has fp32's range and needs none."""
    enabled = dtype == torch.float16
    try:
        return torch.amp.GradScaler(device.type, enabled=enabled)
    except (AttributeError, TypeError):  # older torch: CUDA-only scaler
        return torch.cuda.amp.GradScaler(enabled=enabled and device.type == "cuda")


@torch.no_grad()
def clip_grad_norm(replicated: list[torch.Tensor], sharded: list[torch.Tensor],
                   max_norm: float | None) -> torch.Tensor:
    """Clip by the norm of the *whole* model's gradient, without a host sync; returns that norm.

    Backbone gradients are identical on every rank after the DDP all-reduce, but each rank holds
    only its shard of the class-centre gradients, so their squared norms are summed over ranks
    first; otherwise every rank would clip with a different, too small, norm (and a non-finite
    shard would be seen by one rank only). ``max_norm`` None (or inf): only measure the norm,
    leave the gradients untouched.
    """
    from facerec.distributed import all_reduce

    def sq_norm(params):
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return None
        norms = torch._foreach_norm(grads)
        return torch.stack([n.float() for n in norms]).square().sum()

    parts = [x for x in (sq_norm(replicated),) if x is not None]
    shard_sq = sq_norm(sharded)
    if shard_sq is not None:
        parts.append(all_reduce(shard_sq, "sum"))
    if not parts:
        return torch.zeros(())
    total = torch.stack(parts).sum().sqrt()
    if max_norm is None or math.isinf(max_norm):
        return total
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    grads = [p.grad for p in [*replicated, *sharded] if p.grad is not None]
    torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total
