"""Torch datasets over aligned faces (identity folders or insightface ``.rec``), transforms and a
DataLoader factory.

Tensors are RGB, (3, H, W) float32, normalised as (x/255 - 0.5)/0.5 into [-1, 1] like
arcface_torch. Randomness comes from torch's generator, which DataLoader seeds differently in
every worker (numpy's global generator is copied identically into forked workers).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from facerec.data.align import ensure_three_channels
from facerec.data.degrade import RandomDegradation
from facerec.data.folders import Sample, load_or_build_manifest
from facerec.data.recordio import FaceRecReader

MEAN = 0.5
STD = 0.5


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3); grey files are replicated to three channels."""
    data = np.fromfile(str(path), dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"could not decode {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def to_tensor(image_rgb: np.ndarray) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> normalised float32 (3, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(image_rgb)).permute(2, 0, 1).float()
    return x.div_(255.0).sub_(MEAN).div_(STD)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_tensor`'s normalisation, back to [0, 255] floats."""
    return (x * STD + MEAN) * 255.0


class EvalTransform:
    """Resize to ``size`` if needed (the data should already be aligned), then normalise."""

    def __init__(self, size: int = 112):
        self.size = size

    def resize(self, image: np.ndarray) -> np.ndarray:
        image = ensure_three_channels(image)
        if image.shape[:2] != (self.size, self.size):
            image = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        return image

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return to_tensor(self.resize(image))


class TrainTransform(EvalTransform):
    """Random horizontal flip (p=0.5) and, optionally, light brightness/contrast/saturation jitter
    and image damage (``degrade``, see :mod:`facerec.data.degrade`).

    Only a flip by default: it is all arcface_torch uses, and geometric jitter would undo the
    alignment the model relies on at test time. Damage is applied to the resized crop, before the
    flip, with a NumPy generator seeded from torch's RNG, so a DataLoader worker's seed (and a
    resumed run's restored RNG) decides it like the flip.
    """

    def __init__(self, size: int = 112, flip_p: float = 0.5, photometric: float = 0.0,
                 degrade: RandomDegradation | None = None):
        super().__init__(size)
        self.flip_p = flip_p
        self.photometric = photometric  # max relative change, e.g. 0.2
        self.degrade = degrade

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        image = self.resize(image)
        if self.degrade is not None:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
            image = self.degrade(np.ascontiguousarray(image), rng)
        if torch.rand(()) < self.flip_p:
            image = image[:, ::-1]
        if self.photometric <= 0:
            return to_tensor(image)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
        j = 1.0 + (torch.rand(3) * 2 - 1) * self.photometric
        x = x * j[0]  # brightness
        x = (x - x.mean()) * j[1] + x.mean()  # contrast
        grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
        x = (x - grey) * j[2] + grey  # saturation
        return x.clamp_(0, 255).div_(255.0).sub_(MEAN).div_(STD)


class FolderDataset(Dataset):
    """Aligned images under ``root/<identity>/``, labelled through the (cached) manifest."""

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[np.ndarray], torch.Tensor] | None = None,
        manifest: str | os.PathLike | None = None,
        samples: list[Sample] | None = None,
    ):
        self.root = Path(root)
        self.samples = samples if samples is not None else load_or_build_manifest(root, manifest)
        self.transform = transform or EvalTransform()
        self.num_classes = 1 + max(s.label for s in self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        s = self.samples[index]
        return self.transform(read_rgb(self.root / s.path)), s.label


class RecDataset(Dataset):
    """An insightface ``train.rec`` directory (or file); images come back RGB."""

    def __init__(
        self,
        path: str | os.PathLike,
        transform: Callable[[np.ndarray], torch.Tensor] | None = None,
    ):
        self.reader = FaceRecReader(path)
        self.transform = transform or EvalTransform()
        self._num_classes: int | None = None

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            prop = Path(self.reader.records.rec_path).parent / "property"
            if prop.exists():
                self._num_classes = int(prop.read_text().split(",")[0])
            else:
                self._num_classes = self.reader.num_classes()
        return self._num_classes

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.reader.read(index)
        return self.transform(image), label


def open_dataset(
    path: str | os.PathLike,
    transform: Callable[[np.ndarray], torch.Tensor] | None = None,
) -> Dataset:
    """A RecDataset for a ``.rec`` file or a directory holding ``train.rec``, else a FolderDataset."""
    path = Path(path)
    if path.suffix == ".rec" or (path.is_dir() and (path / "train.rec").exists()):
        return RecDataset(path, transform)
    return FolderDataset(path, transform)


def create_dataloader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    workers: int = 4,
    pin_memory: bool | None = None,
    drop_last: bool = True,
    distributed: bool | None = None,
    seed: int = 0,
    prefetch_factor: int = 2,
    multiprocessing_context: str | None = None,
) -> DataLoader:
    """A DataLoader with persistent workers; under torch.distributed, a DistributedSampler.

    With a DistributedSampler the caller must call ``loader.sampler.set_epoch(epoch)`` every
    epoch, or every epoch sees the same order. ``distributed=None`` detects an initialised
    process group with more than one rank.
    """
    if distributed is None:
        distributed = (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        )
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    sampler = None
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        shuffle = False
    generator = torch.Generator()
    generator.manual_seed(seed)
    kwargs = {}
    if workers > 0:
        # No worker_init_fn that sets thread counts: DataLoader already gives each worker one
        # torch thread, and calling cv2.setNumThreads in a forked worker whose parent had run
        # cv2 and torch thread pools hangs intermittently (seen with OpenCV 5.0 + torch 2.14).
        # ``multiprocessing_context="spawn"`` avoids fork entirely, at a few seconds per worker.
        kwargs = {
            "persistent_workers": True,
            "prefetch_factor": prefetch_factor,
            "multiprocessing_context": multiprocessing_context,
        }
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        **kwargs,
    )
