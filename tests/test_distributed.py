"""Two CPU processes (gloo) give the same loss and gradients as one process on the whole batch.

Covers Partial FC sharding (11 classes over 2 ranks), UNPG over all ranks' features, the CR
target's cross-shard max and ElasticFace+ ranks over the global batch.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import CONFIG, distill_inputs, distill_losses, global_inputs  # noqa: E402

from facerec.losses import FaceRecognitionLoss  # noqa: E402
from service.testing import free_port  # noqa: E402

pytestmark = pytest.mark.timeout(240)


def run_two_ranks(tmp_path, *mode):
    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    worker = Path(__file__).parent / "ddp_worker.py"
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(r), "2", port, str(tmp_path), *mode],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for r in range(2)
    ]
    for p in procs:
        output, _ = p.communicate(timeout=180)
        assert p.returncode == 0, output.decode()[-3000:]


def test_two_ranks_equal_one_process(tmp_path):
    run_two_ranks(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    embeddings, labels, quality, weight = global_inputs()
    loss = FaceRecognitionLoss(**CONFIG).double().train()
    with torch.no_grad():
        loss.centres.weight.copy_(weight)
    emb = embeddings.clone().requires_grad_()
    q = quality.clone().requires_grad_()
    out = loss(emb, labels, q)
    out.total.backward()

    for r in ranks:
        lo, hi = r["local"]
        start, end = r["shard"]
        torch.testing.assert_close(r["total"], out.total.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["classification"], out.classification.detach())
        torch.testing.assert_close(r["quality"], out.quality.detach())
        assert r["num_negatives"] == int(out.num_negatives)
        torch.testing.assert_close(r["quality_target"], out.quality_target[lo:hi])
        torch.testing.assert_close(r["embedding_grad"], emb.grad[lo:hi], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r["quality_grad"], q.grad[lo:hi], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r["weight_grad"], loss.centres.weight.grad[start:end],
                                   rtol=1e-10, atol=1e-12)
    assert ranks[0]["shard"] != ranks[1]["shard"]


def test_distillation_two_ranks_equal_one_process(tmp_path):
    """Relational losses over the gathered batch (teacher embeddings and masks gathered with the
    features) and the embedding loss: every rank reports the global loss and gets its rows'
    single-process gradients; the replicated projection's gradients sum to the single-process one."""
    run_two_ranks(tmp_path, "distill")
    ranks = [torch.load(tmp_path / f"distill_rank{r}.pt") for r in range(2)]

    student, teacher, mask, weight = distill_inputs()
    s = student.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    losses = distill_losses(s, teacher, mask, w)
    sum(losses.values()).backward()

    for r in ranks:
        lo, hi = r["local"]
        for name, value in losses.items():
            torch.testing.assert_close(r[name], value.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["student_grad"], s.grad[lo:hi], rtol=1e-10, atol=1e-12)
        assert torch.all(r["student_grad"][~mask[lo:hi]] == 0)
    torch.testing.assert_close(ranks[0]["weight_grad"] + ranks[1]["weight_grad"], w.grad,
                               rtol=1e-10, atol=1e-12)
    assert all(v.item() > 1e-3 for v in losses.values())
