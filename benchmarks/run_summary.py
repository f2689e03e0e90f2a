"""Summarise training runs from their ``log.jsonl``: validation per evaluation, the collapse monitor,
the first collapse warning, and the command each run was started with.

    python benchmarks/run_summary.py RUN_DIR [RUN_DIR ...] --out benchmarks/results/NAME

Writes NAME.json and NAME.md. Every number comes from the runs' own logs (the trainer writes them;
``docs/training.md``), so a table in the docs can cite this file instead of a log on one machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        raise SystemExit(f"{run_dir}: no log.jsonl (not a training run directory?)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line a kill cut short
            continue
    return records


def started_with(run_dir: Path) -> str | None:
    """The last command line recorded in the run's train.out (written by method_comparison.py)."""
    out = Path(run_dir) / "train.out"
    if not out.exists():
        return None
    lines = [x[2:].split(" ", 2)[-1] for x in out.read_text(errors="replace").splitlines() if x.startswith("# ")]
    return lines[-1] if lines else None


def summarise(run_dir: Path) -> dict:
    records = read_log(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    monitored = [r for r in train if "collapsed_pairs" in r]
    warning = next((r for r in records if r.get("kind") == "message" and "is collapsing" in r.get("text", "")), None)
    warn_step = None
    if warning is not None:
        head = warning["text"].split(":", 1)[0]  # "step N"
        warn_step = int(head.split()[1]) if head.startswith("step ") else warning.get("step")
    return {
        "run": str(run_dir),
        "last_step": train[-1]["step"] if train else None,
        "collapsed_pairs_last": monitored[-1]["collapsed_pairs"] if monitored else None,
        "pair_cos_last": monitored[-1]["pair_cos"] if monitored else None,
        "collapse_warning_step": warn_step,
        "validation": [{k: v for k, v in r.items() if k not in ("kind", "time")} for r in val],
        "command": started_with(run_dir),
        "settings": settings(run_dir),
    }


def settings(run_dir: Path) -> dict:
    """The run's resolved config.yaml, reduced to what tells runs of one study apart."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return {}
    c = yaml.safe_load(path.read_text()) or {}
    loss, optim, train, model = (c.get(k, {}) for k in ("loss", "optim", "train", "model"))
    return {"model": model.get("name"), "margin": loss.get("margin"), "margin_kwargs": loss.get("margin_kwargs"),
            "unpg": loss.get("unpg"), "lr": optim.get("lr"), "epochs": train.get("epochs"),
            "max_steps": train.get("max_steps"), "seed": train.get("seed")}


def markdown(runs: list[dict], command: str) -> str:
    lines = ["# Training runs, from their log.jsonl", "", f"Command: `{command}`", "",
             "| run | settings (config.yaml) | last step | collapsed pairs (last log) | first collapse warning | validation accuracy by step | TAR@FAR 1e-2 at the last validation |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        val = r["validation"]
        acc = ", ".join(f"{v['step']}: {100 * v['accuracy']:.2f}%" for v in val if "accuracy" in v) or "–"
        tar = val[-1].get("tar@far=0.01") if val else None
        cp = r["collapsed_pairs_last"]
        conf = ", ".join(f"{k} {json.dumps(v) if isinstance(v, dict) else v}" for k, v in r["settings"].items()
                         if v not in (None, {}))
        lines.append(f"| {Path(r['run']).name} | {conf or '–'} | {r['last_step']} | {'–' if cp is None else f'{100 * cp:.1f}%'} | "
                     f"{'none' if r['collapse_warning_step'] is None else 'step ' + str(r['collapse_warning_step'])} | "
                     f"{acc} | {'–' if tar is None else f'{100 * tar:.2f}%'} |")
    lines += ["", "Commands the runs were started with (from `train.out`, where recorded):", ""]
    lines += [f"- {Path(r['run']).name}: `{r['command']}`" for r in runs if r["command"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="training run directories (with log.jsonl)")
    parser.add_argument("--out", required=True, type=Path, help="output stem: writes STEM.json and STEM.md")
    args = parser.parse_args(argv)
    command = "python benchmarks/run_summary.py " + " ".join(sys.argv[1:] if argv is None else argv)
    runs = [summarise(r) for r in args.runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "runs": runs}, indent=1))
    md = markdown(runs, command)
    args.out.with_suffix(".md").write_text(md)
    print(md, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
