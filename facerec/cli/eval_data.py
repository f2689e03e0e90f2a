"""What every ``facerec eval`` sub-command shares: the common options, the data set (aligned tree,
LFW protocol split or insightface .bin), detection metadata and the embedding pass.

A module of its own so that ``facerec/cli/eval.py`` and ``facerec/cli/eval_openset.py`` both import
it and neither imports the other.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _common(p: argparse.ArgumentParser, with_bin: bool = True) -> None:
    p.add_argument("model", help="a `facerec export` folder, an .onnx file, or a checkpoint / torch artefact")
    p.add_argument("--images", help="aligned image tree <dir>/<identity>/<image>")
    p.add_argument("--pairs", help="LFW-style pairs.txt whose images are under --images")
    p.add_argument("--protocol", choices=("validation", "lfw-h2"),
                   help="the project's LFW split over --images (an aligned LFW tree)")
    p.add_argument("--data", default=None, help="shared data root for --protocol (default $FACEREC_DATA)")
    if with_bin:
        p.add_argument("--bin", help="insightface verification .bin")
    p.add_argument("--out", required=True, help="report folder (created)")
    p.add_argument("--flip", action="store_true", help="add the mirrored image's embedding (test-time flip)")
    p.add_argument("--cache", default=None, help="npz to reuse / save the embeddings of this model and set")
    p.add_argument("--meta", default=None, help="detection cache (python -m facerec.eval.face_meta)")
    p.add_argument("--threads", type=int, default=0, help="inference threads (0 = runtime default)")
    p.add_argument("--batch", type=int, default=64, help="images per inference batch (default: %(default)d)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@dataclass
class DataSet:
    """Images to embed (paths or decoded crops), their keys and identities, an optional pair list."""

    images: list | np.ndarray
    keys: list[str]
    names: list[str] | None
    pairs: object = None  # facerec.eval.reports.PairList
    description: str = ""


def load_dataset(args) -> DataSet:
    from facerec.data import protocol
    from facerec.data.folders import scan_identity_folders
    from facerec.data.verification import parse_pairs
    from facerec.eval.reports import PairList

    if getattr(args, "bin", None):
        if args.images or args.pairs or args.protocol:
            raise SystemExit("facerec eval: give either --bin or --images, not both")
        return _load_bin(args)
    if not args.images:
        raise SystemExit("facerec eval: give --images DIR (aligned tree)" +
                         (" or --bin FILE" if hasattr(args, "bin") else ""))
    root = Path(args.images)
    if not root.is_dir():
        raise SystemExit(f"facerec eval: --images {root} is not a folder")
    if args.protocol and args.pairs:
        raise SystemExit("facerec eval: --protocol brings its own pairs; drop --pairs")
    pair_list = None
    if args.protocol:
        if not protocol.has_lfw(args.data):
            raise SystemExit(f"facerec eval: no LFW people.txt/pairs.txt under "
                             f"{protocol.data_root(args.data)}")
        people = (protocol.validation_people(args.data) if args.protocol == "validation"
                  else protocol.test_people(args.data))
        keys = [f"{n}/{p.stem}.jpg" for p, n in protocol.lfw_images_of(people, args.data)]
        pair_list = (protocol.validation_pairs(args.data) if args.protocol == "validation"
                     else protocol.lfw_h2_pairs(args.data))
        what = f"{args.protocol} ({'LFW fold 5' if args.protocol == 'validation' else 'LFW folds 6-10'})"
    else:
        keys = [rel for rel, _ in scan_identity_folders(root)]
        what = str(root)
        if args.pairs:
            pair_list = parse_pairs(args.pairs)
    if not keys:
        raise SystemExit(f"facerec eval: no images under {root}")
    paths = [root / k for k in keys]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"facerec eval: {len(missing)} images missing under {root}, e.g. {missing[0]}")
    names = [k.split("/")[0] for k in keys]
    pairs = None
    if pair_list is not None:
        index = {k: i for i, k in enumerate(keys)}
        try:
            a = np.array([index[f"{p.name1}/{p.name1}_{p.index1:04d}.jpg"] for p in pair_list])
            b = np.array([index[f"{p.name2}/{p.name2}_{p.index2:04d}.jpg"] for p in pair_list])
        except KeyError as e:
            raise SystemExit(f"facerec eval: a pair uses an image that is not under {root}: {e}") from None
        folds = np.array([p.fold for p in pair_list])
        if np.unique(folds).size < 2:  # one fold (validation: LFW fold 5): stratified folds within it
            folds = getattr(args, "folds", None) or 10
        pairs = PairList(a, b, np.array([p.same for p in pair_list]), folds,
                         name=f"{args.protocol or Path(args.pairs).name} pairs")
    return DataSet(paths, keys, names, pairs, what)


def _load_bin(args) -> DataSet:
    import cv2

    from facerec.data.verification import load_bin
    from facerec.eval.reports import PairList

    try:
        blobs, issame = load_bin(args.bin)
    except (OSError, ValueError, EOFError) as e:
        raise SystemExit(f"facerec eval: cannot read {args.bin}: {e}") from None
    size = _model_input_size(args.model)
    images = []
    for i, blob in enumerate(blobs):
        img = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise SystemExit(f"facerec eval: image {i} of {args.bin} does not decode")
        if img.shape[0] == img.shape[1] and img.shape[0] != size and img.shape[0] % 112 == 0 and size == 112:
            # insightface's .bin of larger ArcFace crops (224, ...) for a 112 model: the same template
            img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        images.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    n = len(issame)
    pairs = PairList(np.arange(n) * 2, np.arange(n) * 2 + 1, issame, args.folds, name=Path(args.bin).name)
    keys = [f"{i:06d}" for i in range(2 * n)]
    return DataSet(np.stack(images), keys, None, pairs, f"{args.bin} ({n} pairs)")


def _model_input_size(model) -> int:
    """The crop size a model folder's contract names; 112 for a bare graph or a checkpoint."""
    path = Path(model)
    if path.is_dir() and (path / "contract.json").exists():
        from facerec.bundle import ModelBundle

        return ModelBundle(path).contract().input_size
    return 112


def _meta(args, ds: DataSet, detect: bool):
    from facerec.eval.face_meta import FaceMeta, detect_meta

    if args.meta:
        try:
            return FaceMeta.load(args.meta).select(ds.keys)
        except KeyError as e:
            raise SystemExit(f"facerec eval: --meta {args.meta}: {e.args[0]}") from None
    if detect:
        from facerec.data.detect import create_detector

        images = list(ds.images) if isinstance(ds.images, np.ndarray) else ds.images
        return detect_meta(images, ds.keys, create_detector("mtcnn", backend="onnx", threads=1),
                           progress=not args.no_progress)
    return None


def _command() -> str:
    return "facerec " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _embed(args, ds: DataSet):
    from facerec.eval.embedder import embed_cached, load_embedder

    try:
        embedder = load_embedder(args.model, threads=args.threads)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"facerec eval: {e}") from None
    if Path(args.model).is_dir() and len(ds.images):  # a model folder: its contract says the crop
        from facerec.bundle import ModelBundle

        require_crop_size(ModelBundle(args.model).contract(), ds.images[0], "facerec eval")
    return embedder, embed_cached(embedder, ds.images, args.cache, flip=args.flip, batch=args.batch,
                                  progress=not args.no_progress)


def require_crop_size(contract, image, what: str) -> None:
    """One line (SystemExit) when an aligned tree's image is not the model's crop: a tree cut for
    another alignment (ArcFace 112 for a dlib model, say) would be embedded as the wrong faces."""
    if image is None:
        return
    if isinstance(image, (str, Path)):
        from facerec.data.datasets import read_rgb

        image = read_rgb(image)
    h, w = np.asarray(image).shape[:2]
    size = contract.input_size
    if (h, w) != (size, size):
        raise SystemExit(
            f"{what}: the images are {w}x{h}, the model takes {size}x{size} crops on alignment "
            f"{contract.alignment}: align the photos with `facerec align ... --alignment {contract.alignment}"
            f" --size {size}`")
