"""The OOD study's options, shared by its two drivers (``facerec fit-ood``, ``benchmarks/ood_eval.py``).

Light on purpose (no torch): ``facerec fit-ood --help`` reads it. :class:`EvalConfig` is what the
cached inputs depend on; :func:`config_of` builds it from the parsed options, in one place.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from pathlib import Path


def default_cache() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "facerec" / "ood")


def floats(text: str) -> list[float]:
    """'2,4,8' -> [2.0, 4.0, 8.0] (empty items ignored)."""
    return [float(v) for v in text.split(",") if v]


def words(text: str) -> list[str]:
    """'photo,crop' -> ['photo', 'crop'] (empty items ignored)."""
    return [v for v in text.split(",") if v]


@dataclass(frozen=True)
class EvalConfig:
    """What the inputs depend on (sizes per split, attack settings, seed)."""

    checkpoint: str
    faces: int = 500  # LFW photos sampled per split
    attacked: int = 200  # faces attacked / corrupted per set, test split
    attacked_val: int = 100  # the same, validation split
    cifar: int = 1000  # CIFAR images per split, each shown at 32, 112 and 224 px
    skimage_crops: int = 150  # random crops per scikit-image photo
    attack_eps: tuple[float, ...] = (2.0, 4.0, 8.0)  # grey levels (/255)
    domains: tuple[str, ...] = ("photo", "crop")
    pgd_steps: int = 5
    seed: int = 0

    def cache_key(self, feature_dims) -> dict:
        key = asdict(self)
        key["attack_eps"], key["domains"] = list(self.attack_eps), list(self.domains)
        key["feature_dims"] = list(feature_dims)
        key["dodging_reference"] = "gallery"
        key["det_score"] = True  # every set carries the face detector's confidence of each crop
        return key


def config_of(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(
        checkpoint=args.checkpoint,
        faces=args.faces,
        attacked=args.attacked,
        attacked_val=args.attacked_val,
        cifar=args.cifar,
        skimage_crops=args.skimage_crops,
        attack_eps=tuple(floats(args.attack_eps)),
        domains=tuple(words(args.domains)),
        pgd_steps=args.pgd_steps,
        seed=args.seed,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The study's inputs, statistics, attacks and operating point (each driver adds its own)."""
    a = parser.add_argument
    a("--aligned-pool", required=True,
      help="aligned pool tree (`facerec align --preset pool`): the statistics' images")
    a("--data", default=None, help="shared data root (default $FACEREC_DATA or ../shared/data)")
    a("--cache", default=default_cache(),
      help="input / feature cache, outside the repository (default: %(default)s)")
    a("--faces", type=int, default=500, help="LFW photos per split (default: %(default)s)")
    a("--attacked", type=int, default=200,
      help="faces per attack / corruption / control set, test split (default: %(default)s)")
    a("--attacked-val", type=int, default=100,
      help="faces per attack / corruption set, validation split (default: %(default)s)")
    a("--cifar", type=int, default=1000,
      help="CIFAR images per split, each at 32/112/224 px (default: %(default)s)")
    a("--skimage-crops", type=int, default=150,
      help="random crops per scikit-image photo (default: %(default)s)")
    a("--pool-images", type=int, default=3000, help="pool images for the statistics (default: %(default)s)")
    a("--n-prototypes", type=int, default=16, help="prototypes per layer (default: %(default)s)")
    a("--min-identities", type=int, default=20, help="people per prototype, at least (default: %(default)s)")
    a("--shrinkage", type=float, default=0.01, help="covariance shrinkage (default: %(default)s)")
    a("--attack-eps", default="2,4,8", help="FGSM / PGD ε in grey levels (/255), comma list (default: %(default)s)")
    a("--domains", default="photo,crop",
      help="attack the photo (through the alignment) and / or the crop (default: %(default)s)")
    a("--pgd-steps", type=int, default=5, help="PGD steps (default: %(default)s)")
    a("--adaptive-eps", type=float, default=4.0,
      help="ε (/255) of the adaptive PGD against the fitted detector, test only (default: %(default)s)")
    a("--adaptive-steps", type=int, default=10, help="adaptive PGD steps (default: %(default)s)")
    a("--adaptive-weights", default="1,10",
      help="weights of the detector term in the adaptive objective (log-odds above the threshold, "
      "capped at +2); each one is run (default: %(default)s)")
    a("--no-detection-layer", action="store_true",
      help="leave the face detector's confidence out of the combiner (by default it is one more "
      "column: non-faces that pass the detector do so with a low confidence)")
    a("--tpr", type=float, default=0.95, help="TPR on validation faces at the threshold (default: %(default)s)")
    a("--seed", type=int, default=0, help="seed of every sample and attack (default: %(default)s)")
