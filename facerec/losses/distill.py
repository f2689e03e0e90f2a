"""Distillation losses: learn from a teacher's embeddings (``facerec teach`` caches them).

Relational (dimension-free): match the student's in-batch cosine-similarity matrix to the
teacher's, over the pairs of rows that both have a teacher embedding, the diagonal excluded.

- ``kind="kl"`` (default): for every row i, KL(p_i || q_i) between the row-softmaxes of the
  teacher's and the student's similarities to the other rows, at temperatures
  ``teacher_temperature`` and ``temperature``; the mean over rows. The default because it asks
  only for the teacher's *ordering and relative gaps* of each row: adding a constant to a row
  changes nothing. The absolute cosine levels of a teacher and of a margin-trained student differ
  a lot (dlib's same-person cosines are ~0.95 and its different-person ~0.81 on our LFW sample,
  where an ArcFace student puts different people near 0), and ``kind="mse"`` would pull the
  student's impostor cosines up to the teacher's levels, against the margin loss.
- ``kind="mse"``: the mean squared difference of the off-diagonal cosines (RKD-style).

Embedding: a learned linear projection P (no bias) from the student's embedding to the teacher's
space and the cosine loss mean_i (1 - cos(P s_i, t_i)) over the rows with a teacher embedding.

Rows without a teacher embedding (``mask`` False; their teacher row may hold anything, NaN
included) take no part in either loss and get exactly zero gradient.

Under DDP (see :mod:`facerec.losses.face_loss` for the convention) both losses are the global
batch's value on every rank, and each rank's backward gives exactly its rows' share of the
single-process gradient. The relational loss gathers student features (autograd-aware), teacher
embeddings and masks from all ranks, as UNPG does; the projection P is replicated, so, like the
backbone, its gradients are summed over ranks by the trainer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facerec.distributed import all_gather_no_grad, all_gather_with_grad
from facerec.losses.softmax import replicated_scalar_grad, sum_across_ranks

RELATIONAL_KINDS = ("kl", "mse")


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _checked(student: Tensor, teacher: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"expected student (N, Ds) and teacher (N, Dt), got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    n = student.shape[0]
    if mask is None:
        mask = torch.ones(n, dtype=torch.bool, device=student.device)
    if mask.shape != (n,):
        raise ValueError(f"mask must be (N,) = ({n},), got {tuple(mask.shape)}")
    mask = mask.to(device=student.device, dtype=torch.bool)
    student = _at_least_fp32(student)
    teacher = teacher.detach().to(device=student.device, dtype=student.dtype)
    # a row without a teacher embedding may hold NaN: zero it so nothing downstream sees a NaN
    teacher = torch.where(mask[:, None], teacher, torch.zeros_like(teacher))
    return student, teacher, mask


def relational_terms(student: Tensor, teacher: Tensor, mask: Tensor, kind: str = "kl",
                     temperature: float = 0.1, teacher_temperature: float | None = None) -> Tensor:
    """The relational loss of one (already gathered) batch, no distributed logic."""
    if kind not in RELATIONAL_KINDS:
        raise ValueError(f"unknown relational kind {kind!r}; use one of {RELATIONAL_KINDS}")
    s = F.normalize(student, dim=1)
    t = F.normalize(teacher, dim=1)
    sim_s, sim_t = s @ s.t(), t @ t.t()
    n = s.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=s.device)
    pair = mask[:, None] & mask[None, :] & ~eye
    if kind == "mse":
        diff = torch.where(pair, sim_s - sim_t, torch.zeros_like(sim_s))
        return diff.square().sum() / pair.sum().clamp_min(1)
    if temperature <= 0 or (teacher_temperature is not None and teacher_temperature <= 0):
        raise ValueError("temperatures must be positive")
    tt = temperature if teacher_temperature is None else teacher_temperature
    rows = pair.any(dim=1)  # a row needs at least one other row to compare with
    keep = pair | ~rows[:, None]  # rows left out get a harmless all-finite row (masked below)
    neg_inf = torch.full_like(sim_s, float("-inf"))
    log_q = torch.log_softmax(torch.where(keep, sim_s / temperature, neg_inf), dim=1)
    log_p = torch.log_softmax(torch.where(keep, sim_t / tt, neg_inf), dim=1)
    kl = torch.where(pair, log_p.exp() * (log_p - log_q), torch.zeros_like(sim_s))
    return kl.sum() / rows.sum().clamp_min(1)


def relational_distill_loss(student: Tensor, teacher: Tensor, mask: Tensor | None = None,
                            kind: str = "kl", temperature: float = 0.1,
                            teacher_temperature: float | None = None) -> Tensor:
    """Match the student's in-batch cosine matrix to the teacher's (see the module docstring).

    ``student`` (N, Ds) this rank's features (with gradients), ``teacher`` (N, Dt) their teacher
    embeddings, ``mask`` (N,) which rows have one. Under DDP the rows of all ranks are compared.
    """
    student, teacher, mask = _checked(student, teacher, mask)
    student = all_gather_with_grad(student)
    teacher = all_gather_no_grad(teacher)
    mask = all_gather_no_grad(mask)
    loss = relational_terms(student, teacher, mask, kind, temperature, teacher_temperature)
    # every rank computes the same loss from the gathered rows; the gather's backward sums them
    return replicated_scalar_grad(loss)


def embedding_distill_loss(student: Tensor, teacher: Tensor, weight: Tensor,
                           mask: Tensor | None = None) -> Tensor:
    """mean over rows with a teacher of 1 - cos(student @ weight.T, teacher); ``weight`` (Dt, Ds)."""
    student, teacher, mask = _checked(student, teacher, mask)
    if weight.dim() != 2 or weight.shape != (teacher.shape[1], student.shape[1]):
        raise ValueError(f"projection weight must be (Dt, Ds) = ({teacher.shape[1]}, {student.shape[1]}), "
                         f"got {tuple(weight.shape)}")
    projected = student @ _at_least_fp32(weight).to(student.dtype).t()
    cos = F.cosine_similarity(projected, teacher, dim=1, eps=1e-8)
    local = torch.where(mask, 1.0 - cos, torch.zeros_like(cos)).sum()
    count = sum_across_ranks(mask.sum().to(local.dtype).detach())
    return sum_across_ranks(local) / count.clamp_min(1)


class RelationalDistillLoss(nn.Module):
    """:func:`relational_distill_loss` as a module (no parameters)."""

    def __init__(self, kind: str = "kl", temperature: float = 0.1, teacher_temperature: float | None = None):
        super().__init__()
        if kind not in RELATIONAL_KINDS:
            raise ValueError(f"unknown relational kind {kind!r}; use one of {RELATIONAL_KINDS}")
        self.kind, self.temperature, self.teacher_temperature = kind, float(temperature), teacher_temperature

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        return relational_distill_loss(student, teacher, mask, self.kind, self.temperature,
                                       self.teacher_temperature)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, temperature={self.temperature}, teacher_temperature={self.teacher_temperature}"


class EmbeddingDistillLoss(nn.Module):
    """A learned projection student -> teacher space with a cosine loss; owns the projection."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.projection = nn.Linear(int(student_dim), int(teacher_dim), bias=False)

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        return embedding_distill_loss(student, teacher, self.projection.weight, mask)
