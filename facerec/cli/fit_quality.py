"""``facerec fit-quality``: choose the quality measure of a model without a quality head.

An imported model (``facerec import``) has no quality output. This command compares, on the
validation split (LFW fold 5 by default, never the LFW-H2 test people), the measures the service
can give every face without another model call (:mod:`facerec.runtime.quality`):

- ``embedding_norm``: the raw embedding's norm (always a candidate);
- ``crfiqa_head``: a CR-FIQA-style head on the raw embedding, fitted on ``--pool`` embeddings of
  this very graph to their certainty ratio (own identity centre vs the nearest other centre);
- ``detector_score``: the face detector's confidence, from ``--meta`` (a detection cache of the
  ORIGINAL validation photos: ``python -m facerec.eval.face_meta``), as the service detects.

Each is scored by the EDC (:mod:`facerec.eval.quality_choice`); the best one, with the percentiles
of its values on the validation faces (the service's 0-100 score), is written to the model folder
(``quality.npz``, and ``quality_report.json`` with every candidate's numbers) through
:mod:`facerec.bundle`. The service then reports it in every quality answer's ``method``.
"""

from __future__ import annotations

import argparse
import json

HELP = ("choose the quality measure of a model without a quality head (embedding norm, CR-FIQA-style head, "
        "detector score) on validation by EDC")

EPILOG = """\
example (an imported model; aligned trees from `facerec align --preset lfw|pool`):
  facerec fit-quality models/w600k_r50 --images /data/lfw112 --pool /data/pool112 \\
      --meta lfw_meta_val.npz

--protocol validation (default) takes LFW fold 5's people from --images (an aligned LFW tree and
$FACEREC_DATA's people.txt); --protocol none takes every image under --images (a validation set of
your own: never the people you report on). Candidates left out: the head without --pool, the
detector score without --meta. --method picks one yourself (its EDC is still reported).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from facerec.runtime.quality import METHODS

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    a = parser.add_argument
    a("model_dir", help="a model folder without a quality output (`facerec import` / `facerec export`)")
    a("--images", required=True, help="aligned image tree <dir>/<identity>/<image> holding the validation faces")
    a("--protocol", choices=("validation", "none"), default="validation",
      help="validation: LFW fold 5's people (default); none: every image under --images")
    a("--data", default=None, help="shared data root for --protocol validation (default $FACEREC_DATA)")
    a("--pool", default=None, help="aligned training-pool tree: fit the CR-FIQA-style head on it")
    a("--pool-images", type=int, default=5000,
      help="pool images for the head, whole identities sampled (default: %(default)s; 0 = all)")
    a("--meta", default=None, help="detection cache of the original validation photos "
                                   "(python -m facerec.eval.face_meta): makes the detector score a candidate")
    a("--method", choices=("auto", *METHODS), default="auto", help="auto (default): the lowest EDC pAUC")
    a("--fmr", type=float, default=1e-3, help="FMR of the EDC's fixed threshold (default: %(default)g)")
    a("--upper", type=float, default=0.3, help="pAUC over discard 0..UPPER (default: %(default)g)")
    a("--seed", type=int, default=0, help="seed of the pool sample and the head training")
    a("--cache", default=None, help="npz to reuse / save the validation embeddings")
    a("--pool-cache", default=None, help="npz to reuse / save the pool embeddings")
    a("--batch", type=int, default=64, help="images per inference batch (default: %(default)d)")
    a("--threads", type=int, default=0, help="inference threads (0 = runtime default)")
    a("--no-progress", action="store_true", help="no progress bars")
    a("--dry-run", action="store_true", help="print the choice, write nothing")


def _candidates(args, embedder, es, keys) -> tuple[dict, object]:
    """The measures on the validation images (raw embeddings) and the head when one was fitted."""
    import numpy as np

    from facerec.runtime.quality import measure

    found = {"embedding_norm": measure("embedding_norm", es.embedding, None)}
    head = None
    if args.pool:
        from pathlib import Path

        from facerec.eval.crfiqa_head import fit_head_on_pool

        if not Path(args.pool).is_dir():
            raise SystemExit(f"--pool {args.pool} is not a folder")
        head = fit_head_on_pool(embedder, args.pool, cache=args.pool_cache, seed=args.seed, batch=args.batch,
                                progress=not args.no_progress, max_images=args.pool_images or None)
        found["crfiqa_head"] = measure("crfiqa_head", es.embedding, None, head)
    if args.meta:
        from facerec.eval.face_meta import FaceMeta

        try:
            meta = FaceMeta.load(args.meta).select(keys)
        except KeyError as err:
            raise SystemExit(f"--meta {args.meta}: {err.args[0]}") from None
        # A photo where the detector found no face scores lowest: the service would refuse it.
        found["detector_score"] = np.where(meta.found, np.nan_to_num(meta.score), 0.0)
    return found, head


def run(args: argparse.Namespace) -> int:
    from facerec.bundle import BundleError, ModelBundle
    from facerec.cli.eval_data import load_dataset, require_crop_size
    from facerec.eval.calibration import quality_percentiles
    from facerec.eval.embedder import embed_cached, onnx_embedder
    from facerec.eval.quality_choice import choose_measure
    from facerec.runtime.quality import QualityFallback

    model = ModelBundle(args.model_dir)
    try:
        graph = model.graph("fp32")
    except BundleError as err:
        raise SystemExit(str(err)) from None
    embedder = onnx_embedder(graph, args.threads)
    if embedder.has_quality:
        raise SystemExit(f"{graph.name} has its own quality output: the service uses it, there is nothing to fit")
    data = argparse.Namespace(images=args.images, pairs=None, data=args.data,
                              protocol=None if args.protocol == "none" else args.protocol)
    ds = load_dataset(data)
    require_crop_size(model.contract(), ds.images[0] if len(ds.images) else None, f"--images {args.images}")
    if args.pool:
        from pathlib import Path

        first = next((f for f in sorted(Path(args.pool).glob("*/*")) if f.is_file()), None)
        require_crop_size(model.contract(), first, f"--pool {args.pool}")
    es = embed_cached(embedder, ds.images, args.cache, flip=False, batch=args.batch, progress=not args.no_progress)
    measures, head = _candidates(args, embedder, es, ds.keys)
    if args.method != "auto" and args.method not in measures:
        raise SystemExit(f"--method {args.method} needs {'--pool' if args.method == 'crfiqa_head' else '--meta'}")
    try:
        best, table = choose_measure(es.normalised(False), ds.names, measures, args.fmr, args.upper)
    except ValueError as err:
        raise SystemExit(f"{ds.description}: {err}") from None
    method = best if args.method == "auto" else args.method
    where = f"{ds.description}: {len(ds.keys):,} aligned faces of {len(set(ds.names))} people"
    rule = (f"lowest mean FNMR over discard 0-{args.upper:g} of the EDC (all pairs, threshold fixed at "
            f"FMR {args.fmr:g} at 0% discard) on {where}")
    fallback = QualityFallback(
        method, model.contract().contract_id, quality_percentiles(measures[method]), where,
        head if method == "crfiqa_head" else None,
        {"chosen_by": rule if args.method == "auto" else f"--method {method} (EDC of every candidate: {rule})",
         "candidates": {n: {k: round(v, 6) for k, v in r.items() if k != "edc"} for n, r in table.items()},
         "head": None if head is None else head.info})
    print(f"quality measure candidates ({rule}):")
    for name, row in table.items():
        mark = " <- chosen" if name == method else ""
        print(f"  {name:15s} pAUC {row['pauc']:.4f}  FNMR {row['fnmr_at_0']:.4f} at 0%, "
              f"{row['fnmr_at_upper']:.4f} at {args.upper:.0%} discard{mark}")
    if args.dry_run:
        return 0
    fallback.save(model.quality_path)
    report = {"method": method, **fallback.meta, "edc": {n: r["edc"] for n, r in table.items()},
              "contract_id": fallback.contract_id, "graph": graph.name}
    model.quality_report_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {model.quality_path} and {model.quality_report_path.name}: the service reports quality "
          f"method {method!r}")
    return 0
