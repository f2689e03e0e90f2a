"""``facerec eval openset``: open-set (1:N) identification of a model on an aligned tree: CMC, DET at
FPIR and a threshold table (facerec.eval.openset_report). The data options are those of
``facerec eval verify`` (--images with --protocol; no pair list: the people make the searches)."""

from __future__ import annotations

import argparse
from pathlib import Path

from facerec.cli.eval_data import _command, _common, _embed, _floats, load_dataset

HELP = "CMC, DET at FPIR and thresholds at FPIR: half the people enrolled, all their other images searched"


def add_parser(sub, epilog: str) -> None:
    o = sub.add_parser("openset", help=HELP, description=HELP, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(o, with_bin=False)
    o.add_argument("--fpirs", type=_floats, default=[0.1, 0.01, 0.001], help="e.g. 0.1,0.01,0.001")
    o.add_argument("--ranks", type=int, default=20, help="CMC ranks (default: %(default)d)")
    o.add_argument("--seed", type=int, default=0, help="seed of which half of the people is enrolled")


def run(args) -> int:
    from facerec.eval.openset_report import openset_report

    if args.pairs:
        raise SystemExit("facerec eval openset: searches come from the people, not a pair list; drop --pairs")
    ds = load_dataset(args)
    embedder, es = _embed(args, ds)
    try:
        report = openset_report(es.normalised(args.flip), ds.names, args.out, fpirs=args.fpirs, ranks=args.ranks,
                                seed=args.seed, title=f"Open-set identification: {ds.description}",
                                command=_command(), meta={"model": embedder.name, "data": ds.description})
    except ValueError as err:  # too few people or images for the protocol
        raise SystemExit(f"facerec eval openset: {err}") from None
    print((Path(args.out) / "summary.md").read_text())
    print(f"wrote {args.out}: {', '.join(report['files'].values())}, summary.md")
    return 0
