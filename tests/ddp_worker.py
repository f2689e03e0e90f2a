"""One rank of the two-process equivalence test (run by tests/test_distributed.py).

Usage: python tests/ddp_worker.py RANK WORLD PORT OUT_DIR [distill]
Builds the same global batch on every rank, keeps its slice, runs the full objective with
class centres sharded over the ranks, and saves the loss and gradients for the test to compare.
With ``distill``: the distillation losses (relational KL and MSE, embedding) instead.
"""

import os
import sys

import torch
import torch.distributed as dist

from facerec.heads import shard_bounds
from facerec.losses import FaceRecognitionLoss, embedding_distill_loss, relational_distill_loss

CONFIG = dict(num_classes=11, embedding_size=16, margin="elastic_arcface_plus",
              margin_kwargs={"s": 16.0, "sigma": 0.05}, unpg=True, unpg_whisker=1.0, seed=7)
GLOBAL_BATCH = 12


def global_inputs():
    g = torch.Generator().manual_seed(2024)
    embeddings = torch.randn(GLOBAL_BATCH, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (GLOBAL_BATCH,), generator=g)
    labels[3] = -1  # an ignored row: no loss, no UNPG pair, no quality target
    labels[4] = labels[9]  # a positive pair across the two ranks
    quality = torch.randn(GLOBAL_BATCH, generator=g, dtype=torch.float64)
    weight = torch.randn(11, 16, generator=g, dtype=torch.float64)
    return embeddings, labels, quality, weight


def main() -> None:
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    embeddings, labels, quality, weight = global_inputs()
    local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    loss = FaceRecognitionLoss(**CONFIG).double().train()
    start, end = shard_bounds(11, rank, world)
    with torch.no_grad():
        loss.centres.weight.copy_(weight[start:end])
    emb = embeddings[local].clone().requires_grad_()
    q = quality[local].clone().requires_grad_()
    out = loss(emb, labels[local], q)
    out.total.backward()
    torch.save(
        {
            "total": out.total.detach(), "classification": out.classification.detach(),
            "quality": out.quality.detach(), "quality_target": out.quality_target,
            "num_negatives": int(out.num_negatives), "embedding_grad": emb.grad,
            "quality_grad": q.grad, "weight_grad": loss.centres.weight.grad,
            "shard": (start, end), "local": (local.start, local.stop),
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def distill_inputs():
    g = torch.Generator().manual_seed(77)
    student = torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64)
    teacher = torch.randn(GLOBAL_BATCH, 4, generator=g, dtype=torch.float64)
    mask = torch.ones(GLOBAL_BATCH, dtype=torch.bool)
    mask[[1, 8, 9]] = False  # rows without a teacher embedding on both ranks
    teacher[~mask] = float("nan")
    weight = torch.randn(4, 6, generator=g, dtype=torch.float64)
    return student, teacher, mask, weight


def distill_losses(student, teacher, mask, weight):
    return {
        "kl": relational_distill_loss(student, teacher, mask, kind="kl", temperature=0.2,
                                      teacher_temperature=0.1),
        "mse": relational_distill_loss(student, teacher, mask, kind="mse"),
        "embedding": embedding_distill_loss(student, teacher, weight, mask),
    }


def distill_main(rank: int, world: int, out_dir: str) -> None:
    student, teacher, mask, weight = distill_inputs()
    local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    s = student[local].clone().requires_grad_()
    w = weight.clone().requires_grad_()
    losses = distill_losses(s, teacher[local], mask[local], w)
    sum(losses.values()).backward()
    torch.save({**{k: v.detach() for k, v in losses.items()}, "student_grad": s.grad,
                "weight_grad": w.grad, "local": (local.start, local.stop)},
               os.path.join(out_dir, f"distill_rank{rank}.pt"))


if __name__ == "__main__":
    if len(sys.argv) > 5 and sys.argv[5] == "distill":
        rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        distill_main(rank, world, out_dir)
        dist.destroy_process_group()
    else:
        main()
