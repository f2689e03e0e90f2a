"""Distillation losses: brute-force re-derivation, gradients, invariances and masking.

The two-process (gloo) equality test is in tests/test_distributed.py.
"""

import math

import pytest
import torch

from facerec.losses import (
    EmbeddingDistillLoss,
    RelationalDistillLoss,
    embedding_distill_loss,
    relational_distill_loss,
)


def batch(n=7, ds=5, dt=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, ds, generator=g, dtype=dtype), torch.randn(n, dt, generator=g, dtype=dtype))


def cosine(a, b):
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


def brute_relational(student, teacher, mask, kind, temperature, teacher_temperature=None):
    """Loops over rows and pairs, straight from the definition."""
    s, t = student.tolist(), teacher.tolist()
    rows = [i for i in range(len(s)) if mask[i]]
    tt = temperature if teacher_temperature is None else teacher_temperature
    if kind == "mse":
        total, count = 0.0, 0
        for i in rows:
            for j in rows:
                if i != j:
                    total += (cosine(s[i], s[j]) - cosine(t[i], t[j])) ** 2
                    count += 1
        return total / max(count, 1)
    total, used = 0.0, 0
    for i in rows:
        others = [j for j in rows if j != i]
        if not others:
            continue
        zs = [cosine(s[i], s[j]) / temperature for j in others]
        zt = [cosine(t[i], t[j]) / tt for j in others]
        ls = math.log(sum(math.exp(z) for z in zs))
        lt = math.log(sum(math.exp(z) for z in zt))
        for a, b in zip(zs, zt):
            p = math.exp(b - lt)
            total += p * ((b - lt) - (a - ls))
        used += 1
    return total / max(used, 1)


def brute_embedding(student, teacher, weight, mask):
    s, t, w = student.tolist(), teacher.tolist(), weight.tolist()
    losses = []
    for i in range(len(s)):
        if not mask[i]:
            continue
        proj = [sum(w[k][d] * s[i][d] for d in range(len(s[i]))) for k in range(len(w))]
        losses.append(1.0 - cosine(proj, t[i]))
    return sum(losses) / max(len(losses), 1)


MASK = torch.tensor([True, True, False, True, True, False, True])


@pytest.mark.parametrize("kind", ["kl", "mse"])
@pytest.mark.parametrize("masked", [False, True])
def test_relational_equals_brute_force(kind, masked):
    s, t = batch()
    mask = MASK if masked else torch.ones(7, dtype=torch.bool)
    got = relational_distill_loss(s, t, mask, kind=kind, temperature=0.2, teacher_temperature=0.05)
    want = brute_relational(s, t, mask.tolist(), kind, 0.2, 0.05)
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert want > 1e-3  # a real, non-trivial value


def test_embedding_equals_brute_force():
    s, t = batch()
    w = torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = embedding_distill_loss(s, t, w, MASK)
    assert got.item() == pytest.approx(brute_embedding(s, t, w, MASK.tolist()), rel=1e-12)


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_relational_gradcheck(kind):
    s, t = batch(n=5, ds=4, dt=3)
    s.requires_grad_()
    mask = torch.tensor([True, True, False, True, True])
    assert torch.autograd.gradcheck(
        lambda x: relational_distill_loss(x, t, mask, kind=kind, temperature=0.3), (s,))


def test_embedding_gradcheck():
    s, t = batch(n=5, ds=4, dt=3)
    w = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s.requires_grad_()
    w.requires_grad_()
    mask = torch.tensor([True, False, True, True, True])
    assert torch.autograd.gradcheck(lambda x, m: embedding_distill_loss(x, t, m, mask), (s, w))


def random_rotation(d, seed):
    q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_relational_invariant_to_rotations_and_scale(kind):
    s, t = batch()
    base = relational_distill_loss(s, t, MASK, kind=kind)
    rs, rt = random_rotation(5, 1), random_rotation(4, 2)
    assert not torch.allclose(s @ rs, s)
    for s2, t2 in ((s @ rs, t), (s, t @ rt), (s @ rs * 3.0, t @ rt * 0.5)):
        torch.testing.assert_close(relational_distill_loss(s2, t2, MASK, kind=kind), base,
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_relational_zero_when_student_is_teacher(kind):
    s, _ = batch()
    same = relational_distill_loss(s, s.clone(), kind=kind)
    # dimension-free: a student in another dimension with the same geometry also scores zero
    padded = torch.cat([s @ random_rotation(5, 4), torch.zeros(7, 3, dtype=torch.float64)], dim=1)
    assert same.item() == pytest.approx(0.0, abs=1e-12)
    assert relational_distill_loss(padded, s, kind=kind).item() == pytest.approx(0.0, abs=1e-12)
    other = relational_distill_loss(s, batch(seed=9)[0], kind=kind)
    assert other.item() > 1e-3


@pytest.mark.parametrize("loss_fn", [
    lambda s, t, m: relational_distill_loss(s, t, m, kind="kl"),
    lambda s, t, m: relational_distill_loss(s, t, m, kind="mse"),
    lambda s, t, m: embedding_distill_loss(s, t, torch.ones(4, 5, dtype=torch.float64), m),
])
def test_masked_rows_are_ignored(loss_fn):
    s, t = batch()
    s.requires_grad_()
    junk = t.clone()
    junk[~MASK] = float("nan")  # rows without a teacher embedding may hold anything
    loss = loss_fn(s, junk, MASK)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert torch.all(s.grad[~MASK] == 0) and s.grad[MASK].abs().sum() > 0
    # equal to the loss of the kept rows alone
    kept = loss_fn(s.detach()[MASK], t[MASK], None)
    torch.testing.assert_close(loss.detach(), kept, rtol=1e-12, atol=1e-14)
    # and a masked row's student feature does not change it
    s2 = s.detach().clone()
    s2[~MASK] = 100.0
    torch.testing.assert_close(loss_fn(s2, junk, MASK), loss.detach(), rtol=1e-12, atol=1e-14)


def test_no_usable_rows_give_zero_not_nan():
    s, t = batch()
    s.requires_grad_()
    one = torch.zeros(7, dtype=torch.bool)
    one[2] = True  # one row: no pair to compare
    for kind in ("kl", "mse"):
        loss = relational_distill_loss(s, t, one, kind=kind)
        loss.backward()
        assert loss.item() == 0.0 and torch.all(s.grad == 0)
        s.grad = None
    assert embedding_distill_loss(s, t, torch.ones(4, 5, dtype=torch.float64),
                                  torch.zeros(7, dtype=torch.bool)).item() == 0.0


def test_modules_and_training_reduce_the_losses():
    torch.manual_seed(0)
    teacher = torch.randn(32, 6)
    student = torch.randn(32, 10, requires_grad=True)
    relational = RelationalDistillLoss("kl", temperature=0.1)
    embedding = EmbeddingDistillLoss(10, 6)
    opt = torch.optim.Adam([student, *embedding.parameters()], lr=0.05)
    first = None
    for _ in range(150):
        loss = relational(student, teacher) + embedding(student, teacher)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    assert "kind=kl" in repr(relational)


def test_bad_inputs_are_refused():
    s, t = batch()
    with pytest.raises(ValueError, match="relational kind"):
        relational_distill_loss(s, t, kind="l1")
    with pytest.raises(ValueError, match="mask"):
        relational_distill_loss(s, t, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="student"):
        relational_distill_loss(s, t[:3])
    with pytest.raises(ValueError, match="projection weight"):
        embedding_distill_loss(s, t, torch.ones(5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="temperature"):
        relational_distill_loss(s, t, temperature=0.0)
