"""Training data for the trainer: datasets from the config and a resumable, rank-aware sampler.

Exact resume needs the data stream to be a pure function of (seed, epoch, position), whatever
the number of workers or where the run stopped. So the sampler hands out (index, sample seed)
pairs and :class:`SeededDataset` reseeds torch's generator with that seed before the transform
runs: augmentation no longer depends on which worker got the sample or on how many samples that
worker decoded before. The sampler's position is a single integer, saved in checkpoints.

The global batch of step t is ``perm[t*G:(t+1)*G]`` (G = per-rank batch x world size) and rank r
takes the r-th contiguous slice, so N processes see exactly the batch one process would see with
batch G: that is what makes the multi-process equivalence test possible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from facerec.data.datasets import FolderDataset, RecDataset, TrainTransform
from facerec.data.folders import Sample, folder_samples

_SEED_STRIDE = 1 << 32


def _worker_init(_: int) -> None:
    # One process per worker already uses the cores; nested thread pools only oversubscribe them.
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise ValueError(f"{num_samples} samples cannot fill one global batch of {global_batch}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.steps_per_epoch = num_samples // global_batch  # the remainder is dropped
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate ``epoch`` from its ``start_step``-th batch (a resumed, part-done epoch)."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self):
        order = self._order().tolist()
        base = self.seed * _SEED_STRIDE + self.epoch * self.num_samples
        g = self.batch_size * self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            first = step * g + self.rank * self.batch_size
            yield [(order[p], base + p) for p in range(first, first + self.batch_size)]


class SeededDataset(Dataset):
    """Wraps a dataset so item ``(index, seed)`` is drawn with torch's generator seeded by ``seed``."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed % (1 << 63))
            return self.base[index]


class SyntheticFaces(Dataset):
    """Identity = a smooth random image (made from the class id); each draw adds noise, a shift
    and a flip from torch's generator. Lazy, so 100k classes cost no memory."""

    def __init__(self, num_classes: int, images_per_class: int, noise: float = 0.35,
                 seed: int = 0, class_offset: int = 0, size: int = 112):
        self.num_classes, self.images_per_class = num_classes, images_per_class
        self.noise, self.seed, self.offset, self.size = noise, seed, class_offset, size

    def __len__(self) -> int:
        return self.num_classes * self.images_per_class

    def prototype(self, label: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 7919 + label + self.offset)
        coarse = torch.randn(1, 3, 14, 14, generator=g)
        return F.interpolate(coarse, size=(self.size, self.size), mode="bilinear", align_corners=False)[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = index % self.num_classes
        image = self.prototype(label) + self.noise * torch.randn(3, self.size, self.size)
        shift = torch.randint(-4, 5, (2,)).tolist()
        image = torch.roll(image, shifts=shift, dims=(1, 2))
        if torch.rand(()) < 0.5:
            image = image.flip(2)
        return F.hardtanh(image), label


def center_crop(image: np.ndarray, size: int | None) -> np.ndarray:
    if not size:
        return image
    h, w = image.shape[:2]
    size = min(size, h, w)
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


class CropThen:
    """Centre crop (for unaligned, roughly centred faces such as LFW deep-funneled), then ``inner``."""

    def __init__(self, inner, crop: int | None):
        self.inner, self.crop = inner, crop

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.inner(center_crop(image, self.crop))


def select_identities(samples: list[Sample], identity_range=None, min_images: int = 1,
                      keep_small: bool = False) -> list[Sample]:
    """Keep a [start, end) range of the sorted identities with enough images; labels renumbered.

    ``keep_small``: the range's identities with fewer than ``min_images`` images stay, with label
    -1 (no class: they feed the distillation terms only); identities outside the range never do.
    """
    names = sorted({s.identity for s in samples})
    if identity_range is not None:
        names = names[identity_range[0] : identity_range[1]]
    counts: dict[str, int] = {}
    for s in samples:
        counts[s.identity] = counts.get(s.identity, 0) + 1
    labels = {n: i for i, n in enumerate(n for n in names if counts.get(n, 0) >= min_images)}
    if keep_small:
        labels.update({n: -1 for n in names if n not in labels})
    return [Sample(s.path, labels[s.identity], s.identity, s.sha1) for s in samples if s.identity in labels]


def pool_samples(root: str | None, sources, pins: str | None = None) -> list[Sample]:
    from facerec.data.protocol import pool_images

    items = pool_images(root, tuple(sources), pins=pins)  # checks the held-out people are absent
    return [Sample(str(path), 0, ident) for path, ident in items]


def exclude_samples(samples: list[Sample], exclude_file: str) -> list[Sample]:
    """The samples without those listed in ``exclude_file`` (see DataConfig.exclude). A listed
    image the dataset does not have is an error: the list was made for another dataset."""
    path = Path(exclude_file)
    if not path.is_file():
        raise FileNotFoundError(f"data.exclude: {path} does not exist")
    listed = {line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}
    unknown = listed - {s.path for s in samples}
    if unknown:
        raise ValueError(f"data.exclude: {len(unknown)} listed images are not in the dataset (made for "
                         f"another dataset?), e.g. {sorted(unknown)[0]!r}")
    return [s for s in samples if s.path not in listed]


PROTOCOL_CHECK = ("the protocol identity check (no LFW validation, LFW-H2 test or reserved Pins person "
                  "among the training identities) did not run")
_PREFIXES = ("lfw", "pins", "yaleb", "orl", "yale", "celeba", "celeba10k")


def protocol_identity_check(samples: list[Sample]) -> str | None:
    """For an aligned copy of the protocol pool (every identity carries a source prefix such as
    ``lfw__`` or ``pins__``) and with the shared data present: raise if a validation, LFW-H2 or
    reserved person is among the identities. Returns None when the check ran, else why not."""
    from facerec.data import protocol

    idents = {s.identity for s in samples}
    if not idents:
        return f"{PROTOCOL_CHECK}: no identities"
    unprefixed = sorted(i for i in idents if not (protocol.SEP in i and i.partition(protocol.SEP)[0] in _PREFIXES))
    if unprefixed:
        return (f"{PROTOCOL_CHECK}: {len(unprefixed)} of {len(idents)} identity folders have no source prefix "
                f"({', '.join(p + protocol.SEP for p in _PREFIXES)}), e.g. {unprefixed[0]!r}, so their "
                "people cannot be matched against the held-out lists")
    if not protocol.has_lfw():
        return (f"{PROTOCOL_CHECK}: the shared LFW data (lfw/people.txt and lfw/pairs.txt under "
                f"{protocol.data_root(None)}; set FACEREC_DATA) is absent, so the held-out people are unknown")
    protocol.check_identities_absent([(Path(i), i) for i in sorted(idents)])
    return None


def check_protocol_identities(samples: list[Sample]) -> bool:
    """:func:`protocol_identity_check`; returns whether the check ran."""
    return protocol_identity_check(samples) is None


REC_CHECK_SKIPPED = (f"{PROTOCOL_CHECK}: insightface .rec/.idx data carries numeric class labels only, no "
                     "identity names, so its people cannot be matched against the held-out lists; check "
                     "the image folders the .rec was packed from (data.kind=folder runs the check)")


def build_dataset(cfg, seed: int, keep_small_identities: bool = False) -> Dataset:
    """The training dataset of ``cfg`` (a DataConfig); ``.num_classes`` is set on it.

    ``keep_small_identities`` (folder, pool): identities below ``cfg.min_images_per_identity`` are
    kept with label -1 instead of dropped (see :func:`select_identities`); they are no class.

    Real data is checked against the protocol's held-out people where that is possible; where it
    is not, the dataset's ``protocol_check_skipped`` says which check did not run and why (the
    trainer logs it once as a warning). Synthetic data has no people and needs no check.
    """
    transform = CropThen(TrainTransform(flip_p=0.5 if cfg.flip else 0.0, photometric=cfg.photometric,
                                        degrade=cfg.degrade), cfg.center_crop)
    if cfg.kind == "synthetic":
        return SyntheticFaces(cfg.num_classes, cfg.images_per_class, cfg.noise, seed)
    if cfg.kind == "rec":
        dataset = RecDataset(cfg.path, transform)
        dataset.protocol_check_skipped = REC_CHECK_SKIPPED
        return dataset
    skipped = None
    if cfg.kind == "folder":
        samples = folder_samples(cfg.path, cfg.manifest)
        skipped = protocol_identity_check(samples)
        root = cfg.path
    else:  # pool: absolute paths from the protocol, so the root is '/'
        samples = pool_samples(cfg.path, cfg.pool_sources, cfg.pins)
        root = Path(samples[0].path).anchor if samples else "/"
    if cfg.exclude:
        samples = exclude_samples(samples, cfg.exclude)
    samples = select_identities(samples, cfg.identity_range, cfg.min_images_per_identity, keep_small_identities)
    if not any(s.label >= 0 for s in samples):
        raise ValueError("no training images left after identity selection")
    dataset = FolderDataset(root, transform, samples=samples)
    dataset.protocol_check_skipped = skipped
    return dataset


def class_counts(dataset: Dataset) -> torch.Tensor | None:
    """Images per class of a training dataset, or None when the dataset cannot say cheaply."""
    n = int(dataset.num_classes)
    if isinstance(dataset, SyntheticFaces):
        return torch.full((n,), dataset.images_per_class, dtype=torch.long)
    if isinstance(dataset, FolderDataset):
        labels = torch.tensor([s.label for s in dataset.samples], dtype=torch.long)
        return torch.bincount(labels[labels >= 0], minlength=n)  # label -1: no class
    if isinstance(dataset, RecDataset):
        ranges = dataset.reader.identity_ranges()
        if len(ranges) == n:
            return torch.tensor([end - start for start, end in ranges], dtype=torch.long)
    return None


def build_loader(dataset: Dataset, sampler: ResumableBatchSampler, cfg, pin_memory: bool) -> DataLoader:
    kwargs = {}
    if cfg.workers > 0:
        kwargs = dict(persistent_workers=True, prefetch_factor=cfg.prefetch_factor,
                      worker_init_fn=_worker_init)
    return DataLoader(SeededDataset(dataset), batch_sampler=sampler, num_workers=cfg.workers,
                      pin_memory=pin_memory, **kwargs)
