"""``facerec demo``: a few real training steps on synthetic faces, printing the losses.

Not a benchmark and not a model worth keeping: it shows, in under a minute on a laptop CPU,
that a backbone, a margin (ElasticFace+ by default), UNPG and the quality-token loss train
together, and what their numbers look like when they do.
"""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from facerec.heads import list_margins
    from facerec.models import trainable_models

    parser.add_argument("--model", default="vit_tiny_fiqa", choices=trainable_models(),
                        help="backbone (default: %(default)s, which has a quality token)")
    parser.add_argument("--margin", default="elastic_arcface_plus", choices=list_margins(),
                        help="margin (default: %(default)s)")
    parser.add_argument("--no-unpg", dest="unpg", action="store_false",
                        help="train without UNPG in-batch negative pairs")
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    parser.add_argument("--classes", type=int, default=8,
                        help="synthetic identities (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--log-every", type=int, default=5, help="default: %(default)s")


def synthetic_batch(prototypes, batch_size: int, generator):
    """Identity = a fixed smooth random image; each sample adds noise, a shift and a flip."""
    import torch
    import torch.nn.functional as F

    classes = prototypes.shape[0]
    labels = torch.randint(0, classes, (batch_size,), generator=generator)
    images = prototypes[labels]
    images = images + 0.35 * torch.randn(images.shape, generator=generator)
    shift = torch.randint(-4, 5, (2,), generator=generator).tolist()
    images = torch.roll(images, shifts=shift, dims=(2, 3))
    flip = torch.rand(batch_size, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    return F.hardtanh(images), labels


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from facerec.losses import FaceRecognitionLoss
    from facerec.models import create_model

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = create_model(args.model).to(device)
    loss_fn = FaceRecognitionLoss(
        args.classes, model.embedding_size, margin=args.margin, unpg=args.unpg, seed=args.seed
    ).to(device)
    params = list(model.parameters()) + list(loss_fn.parameters())
    optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(args.seed)
    coarse = torch.randn(args.classes, 3, 14, 14, generator=generator)
    prototypes = F.interpolate(coarse, size=(112, 112), mode="bilinear", align_corners=False)

    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"facerec demo: {args.model} ({n_params:.2f} M params), margin {args.margin}, "
          f"UNPG {'on' if args.unpg else 'off'}, quality loss "
          f"{'on' if model.has_quality else 'off (model has no quality head)'}, "
          f"{args.classes} synthetic identities, batch {args.batch_size}, {device}")
    print(f"{'step':>5} {'total':>9} {'ce':>9} {'quality':>9} {'cr_mean':>8} {'unpg_K':>7} {'img/s':>7}")
    model.train()
    loss_fn.train()
    start = time.perf_counter()
    history = []
    for step in range(1, args.steps + 1):
        images, labels = synthetic_batch(prototypes, args.batch_size, generator)
        images, labels = images.to(device), labels.to(device)
        out = model(images)
        losses = loss_fn(out.embedding, labels, out.quality)
        optimiser.zero_grad(set_to_none=True)
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimiser.step()
        history.append(losses.classification.item())
        if step % args.log_every == 0 or step == 1 or step == args.steps:
            rate = step * args.batch_size / (time.perf_counter() - start)
            q = f"{losses.quality.item():9.4f}" if losses.quality is not None else f"{'-':>9}"
            cr = (f"{losses.quality_target.mean().item():8.3f}"
                  if losses.quality_target is not None else f"{'-':>8}")
            print(f"{step:5d} {losses.total.item():9.3f} {losses.classification.item():9.3f} "
                  f"{q} {cr} {int(losses.num_negatives):7d} {rate:7.1f}")
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    print(f"classification loss: first 5 steps {first:.3f} -> last 5 steps {last:.3f}")
    return 0
