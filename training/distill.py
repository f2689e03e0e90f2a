"""``loss.distill`` in the trainer: the teacher's embedding of every training image, the dataset
wrapper that tells the trainer which images a batch holds, and the distillation terms.

At the start every training image is keyed as ``facerec teach`` keyed it (the sha256 of the bytes
the dataset reads: the file, or a ``.rec`` record's encoded image; the functions of
:mod:`facerec.teachers.compute`) and looked up once in the cache; the (N, Dt) float32 teacher rows
and the (N,) found mask stay in host memory, and each step takes the rows of its batch's sample
indices. Rows without a teacher embedding (not in the cache, or no face found by the teacher) take
no part in the distillation terms.

The terms follow the gradient-sum contract of ``docs/training.md``: every rank gets the global
batch's value, and its backward gives its rows' share of the single-process gradient. The
embedding term's projection P is replicated like the backbone but lives outside the DDP-wrapped
model (so the model's state dict, and every export of it, stays the backbone's), so
:meth:`Distillation.sum_gradients` all-reduces (sums) its gradient after the backward pass.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset

from facerec.data.datasets import FolderDataset, RecDataset
from facerec.losses import EmbeddingDistillLoss, RelationalDistillLoss
from facerec.teachers.cache import TeacherCache, TeacherCacheError, content_hash
from facerec.teachers.compute import read_bytes

COVERAGE_WARN = 0.5  # warn when fewer training images than this have a teacher embedding


class IndexedDataset(Dataset):
    """``base[i]`` followed by ``i``: the trainer looks the batch's teacher rows up by index."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        return (*self.base[index], index)


def sample_sources(dataset: Dataset) -> list[tuple]:
    """The image source (:func:`facerec.teachers.compute.read_bytes`) of every training sample."""
    if isinstance(dataset, FolderDataset):
        return [("file", str(dataset.root / s.path)) for s in dataset.samples]
    if isinstance(dataset, RecDataset):
        rec = str(dataset.reader.records.rec_path)
        return [("rec", rec, i) for i in range(len(dataset))]
    raise ValueError(f"loss.distill: cannot key the images of a {type(dataset).__name__} (folder, pool or rec data)")


def sample_hashes(dataset: Dataset, progress: bool = False) -> list[str]:
    """The teacher-cache key of every training sample, in dataset order. The training data is read
    once in all: under DDP each rank hashes every world-th image and the ranks exchange keys."""
    from tqdm import tqdm

    sources = sample_sources(dataset)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    mine = [content_hash(read_bytes(s)) for s in tqdm(sources[rank::world], desc="teacher keys", unit="img",
                                                      disable=not progress)]
    if not distributed:
        return mine
    shares: list[list[str] | None] = [None] * world
    dist.all_gather_object(shares, mine)
    hashes = [""] * len(sources)
    for r, share in enumerate(shares):
        hashes[r::world] = share
    return hashes


def open_cache(path: str) -> TeacherCache:
    """The cache of ``loss.distill.cache``, refused with a message when it is missing or empty."""
    how = f"compute it with `facerec teach <teacher> --data <the training data> --out {path}`"
    if not Path(path).exists():
        raise ValueError(f"loss.distill.cache={path} does not exist: {how}")
    try:
        cache = TeacherCache(path)
    except TeacherCacheError as err:
        raise ValueError(f"loss.distill.cache: {err}") from None
    if len(cache) - len(cache.no_face) == 0:
        raise ValueError(f"loss.distill.cache={path} holds no teacher embedding (empty, or the teacher found "
                         f"no face in any image): {how}")
    return cache


class DistillTerms(nn.Module):
    """The weighted relational and embedding terms; owns the projection (when the embedding term is on)."""

    def __init__(self, cfg, student_dim: int, teacher_dim: int, seed: int):
        super().__init__()
        self.relational_weight, self.embedding_weight = float(cfg.relational_weight), float(cfg.embedding_weight)
        self.relational = None
        if self.relational_weight > 0:
            self.relational = RelationalDistillLoss(cfg.relational_kind, cfg.temperature, cfg.teacher_temperature)
        self.embedding = None
        if self.embedding_weight > 0:
            self.embedding = EmbeddingDistillLoss(student_dim, teacher_dim)
            # nn.Linear's uniform(+-1/sqrt(fan_in)), but from its own generator: the same start on
            # every rank and whatever else drew from the global one
            g = torch.Generator().manual_seed(int(seed) + 15485863)
            weight = self.embedding.projection.weight
            bound = 1.0 / math.sqrt(student_dim)
            with torch.no_grad():
                weight.copy_((torch.rand(weight.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound)

    @property
    def names(self) -> list[str]:
        return [n for n in ("relational", "embedding") if getattr(self, n) is not None]

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(weighted sum, {name: unweighted term}) over the rows with ``mask`` True."""
        terms: dict[str, Tensor] = {}
        if self.relational is not None:
            terms["relational"] = self.relational(student, teacher, mask)
        if self.embedding is not None:
            terms["embedding"] = self.embedding(student, teacher, mask)
        weights = {"relational": self.relational_weight, "embedding": self.embedding_weight}
        total = sum(weights[name] * value for name, value in terms.items())
        return total, terms


class Distillation:
    """Teacher rows of the training set + :class:`DistillTerms`, for one trainer."""

    def __init__(self, cfg, dataset: Dataset, student_dim: int, seed: int, device: torch.device,
                 progress: bool = False):
        self.cfg = cfg
        cache = open_cache(cfg.cache)
        self.teacher_id = cache.teacher_id
        hashes = sample_hashes(dataset, progress)
        rows, found = cache.lookup(hashes)
        self.teacher = torch.from_numpy(rows)  # (N, Dt) float32, host memory
        self.found = torch.from_numpy(found)  # (N,) bool
        self.no_face = sum(h in cache.no_face for h in hashes)
        labels = [s.label for s in getattr(dataset, "samples", [])]
        self.unlabelled = sum(label < 0 for label in labels)
        self.unlabelled_found = sum(bool(f) for f, label in zip(found, labels) if label < 0)
        self.terms = DistillTerms(cfg, student_dim, cache.embedding_size, seed).to(device)
        self.params = [p for p in self.terms.parameters() if p.requires_grad]

    @property
    def coverage(self) -> float:
        return float(self.found.float().mean()) if len(self.found) else 0.0

    def messages(self, min_images: int) -> list[str]:
        n, have = len(self.found), int(self.found.sum())
        lines = [f"distillation from teacher {self.teacher_id} ({self.cfg.cache}): {have:,} of {n:,} training "
                 f"images ({self.coverage:.1%}) have a teacher embedding ({self.no_face:,} without a face for the "
                 f"teacher, {n - have - self.no_face:,} not in the cache); terms: {', '.join(self.terms.names)}"]
        if self.coverage < COVERAGE_WARN:
            lines.append(f"warning: only {self.coverage:.1%} of the training images have a teacher embedding: was "
                         f"the cache computed over this training data (`facerec teach ... --out {self.cfg.cache}`)?")
        if self.unlabelled:
            lines.append(f"{self.unlabelled:,} images of identities with fewer than {min_images} images feed "
                         f"distillation only (label -1; {self.unlabelled_found:,} of them have a teacher embedding)")
        return lines

    def wrap(self, dataset: Dataset) -> IndexedDataset:
        return IndexedDataset(dataset)

    def loss(self, student: Tensor, index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted distillation loss of the batch with sample indices ``index`` (host tensor)."""
        index = index.cpu()
        teacher = self.teacher[index].to(student.device, non_blocking=True)
        mask = self.found[index].to(student.device, non_blocking=True)
        # In float32 even under AMP: the row-softmax divides cosines by a small temperature, and
        # bf16's steps of ~0.004 near a cosine of 0.9 (where dlib's sit) would be ~0.2 logit steps
        # at a teacher temperature of 0.02. The terms cost O(B^2), nothing beside the backbone.
        with torch.autocast(student.device.type, enabled=False):
            if student.dtype in (torch.float16, torch.bfloat16):
                student = student.float()
            return self.terms(student, teacher, mask)

    def sum_gradients(self) -> None:
        """Sum the projection's gradient over ranks (the backbone's comm hook does the same)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        for p in self.params:
            if p.grad is not None:
                dist.all_reduce(p.grad)

    def state_dict(self) -> dict:
        return self.terms.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.terms.load_state_dict(state)


def load_distill_state(distill: Distillation | None, rank_state: dict, path) -> None:
    """Restore the projection of a checkpoint; refuse to switch distillation on or off in a resume."""
    if distill is not None and "distill" not in rank_state:
        raise ValueError(f"{path} was trained without loss.distill: a resumed run cannot start distilling (its "
                         "optimiser has no state for the projection); start a new run from its weights with "
                         f"--set model.init_from={path}")
    if distill is None and "distill" in rank_state:
        raise ValueError(f"{path} was trained with loss.distill: resume it with the same loss.distill, or start a "
                         f"new run from its weights with --set model.init_from={path}")
    if distill is not None:
        distill.load_state_dict(rank_state["distill"])
