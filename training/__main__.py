"""Command line: ``python -m training`` / ``torchrun -m training`` / ``facerec-train``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

EPILOG = """\
examples:
  python -m training --config tiny_cpu
  python -m training --config tiny_cpu --set train.epochs=2 --set optim.lr=0.05
  python -m training --config pool_mobilefacenet --resume auto
  torchrun --nproc_per_node 8 -m training --config ms1mv3_r50 --resume auto
A bare config name is looked up in training/configs/. Values of --set are parsed as YAML.
"""


def config_path(name: str) -> Path:
    path = Path(name)
    if path.exists():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.exists():
            return candidate
    raise SystemExit(f"config {name!r} not found (looked in . and {CONFIG_DIR})")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="facerec-train", description="Train a face recognition model.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", default="tiny_cpu", help="YAML config (path or name)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=0.05 (repeatable)")
    parser.add_argument("--run-dir", help="shortcut for --set run_dir=...")
    parser.add_argument("--resume", help="checkpoint directory, run directory, or 'auto' (latest in run_dir)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from training.config import load_config

    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    config = load_config(config_path(args.config), overrides)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    from training.dist import close_distributed
    from training.trainer import NonFiniteError, Trainer

    try:
        trainer = Trainer(config, resume=args.resume)
        summary = trainer.fit()
    except NonFiniteError as e:
        print(f"facerec-train: {e}", file=sys.stderr)
        return 3
    finally:
        close_distributed()
    if trainer.info.is_main and summary.get("best") is not None:
        print(f"best {config.val.metric} on validation: {summary['best']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
