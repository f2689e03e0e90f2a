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
  python -m training --resume runs/pool_mobilefacenet --set train.progress=false
  torchrun --nproc_per_node 8 -m training --config ms1mv3_r50 --resume auto
A bare config name is looked up in training/configs/. Values of --set are parsed as YAML.
--resume without --config continues under the config stored with the checkpoint (plus --set);
with --config, the resolved config must match the stored one except for run-control fields
(logging, progress, workers, checkpoint cadence), or --force-config must be given.
"""

DEFAULT_CONFIG = "tiny_cpu"


def config_path(name: str) -> Path:
    """A config file: the path as given, else a shipped config of that name, resolved against the
    installed package (so `training/configs/x.yaml` also works outside the repository root)."""
    path = Path(name)
    if path.exists():
        return path
    candidates = [CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"]
    if path.parent.parts[-2:] == ("training", "configs"):
        candidates.append(CONFIG_DIR / path.name)
    for candidate in candidates:
        if candidate.exists():
            return candidate
    shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise SystemExit(f"facerec-train: config {name!r} not found (neither a file nor one of the shipped "
                     f"configs: {shipped})")


# Config fields that name files or folders, checked before training starts.
PATH_FIELDS = ("data.path", "data.manifest", "data.pins", "data.exclude", "val.path", "val.data_root",
               "model.init_from", "loss.distill.cache")


def check_paths(config) -> None:
    """Refuse, in one line, a config whose files or folders do not exist (before any work starts)."""
    tree = config.model_dump()
    unused = {"val": tree["val"]["kind"] == "none", "data": tree["data"]["kind"] == "synthetic"}
    for field in PATH_FIELDS:
        if unused.get(field.split(".")[0]) and field != "data.exclude":
            continue  # a section that reads no files (val.kind=none, synthetic data): its paths are unused
        value = tree
        for part in field.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value and not Path(value).exists():
            where = "" if Path(value).is_absolute() else (
                f" (relative to the working directory {Path.cwd()}; run from the folder it is relative to, "
                "e.g. the repository root, or give an absolute path)")
            raise SystemExit(f"facerec-train: {field} {value} does not exist{where}")


def build_parser() -> argparse.ArgumentParser:
    import facerec
    from facerec.cli.usage import OneLineParser

    parser = OneLineParser(prog="facerec-train", description="Train a face recognition model.",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"facerec-train {facerec.__version__}",
                        help="print the version and exit")
    parser.add_argument("--config", "-c", default=None,
                        help=f"YAML config (path or name); default: {DEFAULT_CONFIG}, or with --resume the "
                             "config stored with the checkpoint")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=0.05 (repeatable)")
    parser.add_argument("--run-dir", help="shortcut for --set run_dir=...")
    parser.add_argument("--resume", help="checkpoint directory, run directory, or 'auto' (latest in run_dir)")
    parser.add_argument("--force-config", action="store_true",
                        help="with --resume and --config: resume even where the config differs from the "
                             "checkpoint's stored config in fields that change what is computed")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _run_dir_override(overrides: list[str]) -> str | None:
    from training.config import apply_override

    tree: dict = {}
    for assignment in overrides:
        apply_override(tree, assignment)
    value = tree.get("run_dir")
    return None if value is None else str(value)


def stored_config(resume: str, run_dir: str | Path) -> Path | None:
    """The resolved config a resume would continue: the checkpoint's own config.yaml, else the
    run directory's; None when ``resume`` finds no checkpoint (``auto`` then starts afresh)."""
    from training.checkpoint import resolve_resume

    try:
        checkpoint = resolve_resume(resume, Path(run_dir) / "checkpoints")
    except FileNotFoundError as err:
        raise SystemExit(f"facerec-train: {err}") from None
    if checkpoint is None:
        return None
    for candidate in (checkpoint / "config.yaml", checkpoint.parent.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    raise SystemExit(f"facerec-train: --resume {resume}: {checkpoint} has no stored config.yaml; "
                     "give --config")


def resolve_config(args: argparse.Namespace):
    """The run's config from the command line, checked against the checkpoint it resumes."""
    import yaml

    from training.config import Config, apply_override, config_differences, load_config

    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    run_dir = _run_dir_override(overrides)
    if args.resume and args.config is None:
        if run_dir is None and args.resume == "auto":
            run_dir = load_config(config_path(DEFAULT_CONFIG)).run_dir
        stored = stored_config(args.resume, run_dir or "")
        if stored is not None:
            tree = yaml.safe_load(stored.read_text()) or {}
            if run_dir is None:  # --resume RUN_DIR (or a checkpoint of it): train on there
                checkpoint = stored.parent if (stored.parent / "meta.json").exists() else None
                run = stored.parent  # run_dir/config.yaml
                if checkpoint is not None:
                    in_run = checkpoint.parent.name == "checkpoints"
                    run = checkpoint.parent.parent if in_run else checkpoint.parent
                tree["run_dir"] = str(run)
            for assignment in overrides:
                tree = apply_override(tree, assignment)
            try:
                return Config.model_validate(tree)
            except ValueError as err:  # pydantic's ValidationError is a ValueError
                raise SystemExit(f"facerec-train: the stored config {stored} (with --set) is not valid "
                                 f"for this version: {err}\nGive --config to resume under another config.") from None
        # --resume auto in a run directory without a checkpoint yet: a fresh run of the default
    config = load_config(config_path(args.config or DEFAULT_CONFIG), overrides)
    if args.resume and not args.force_config:
        stored = stored_config(args.resume, config.run_dir)
        if stored is not None:
            try:
                previous = Config.model_validate(yaml.safe_load(stored.read_text()) or {})
            except ValueError as err:
                raise SystemExit(f"facerec-train: cannot compare with the stored config {stored}, which is "
                                 f"not valid for this version: {err}\nAdd --force-config to resume under "
                                 "the given config.") from None
            differences = config_differences(previous, config)
            if differences:
                lines = "\n".join(f"  {key}: {old!r} (stored) -> {new!r}" for key, old, new in differences)
                raise SystemExit(
                    f"facerec-train: --resume {args.resume}: the resolved config differs from the one "
                    f"the checkpoint was trained with ({stored}) in fields that change the result:\n"
                    f"{lines}\nTo continue the run as it was, drop --config (the stored config is used, "
                    "plus --set) or make --config/--set match; to resume under the new values anyway, "
                    "add --force-config.")
    return config


def main(argv=None, callbacks=()) -> int:
    """``callbacks``: run with the trainer after every step (``Trainer``); the crash tests use one."""
    import yaml

    from facerec.cli.usage import user_errors

    args = parse_args(argv)
    # While the config is read, a ValueError can only be a mistake in it (an override that is not
    # key=value, a section that is a value); yaml's errors are mistakes in a file.
    with user_errors("facerec-train", ValueError, yaml.YAMLError):
        config = resolve_config(args)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    with user_errors("facerec-train"):
        check_paths(config)
    from training.dist import close_distributed
    from training.trainer import NonFiniteError, Trainer

    try:
        with user_errors("facerec-train"):  # a missing file found while the run is set up
            trainer = Trainer(config, resume=args.resume, callbacks=callbacks)
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
