"""The comparison that justifies the methods: every margin, with and without UNPG, same pool, same budget.

    python benchmarks/method_comparison.py train  --protocol cpu --pool ALIGNED_POOL --lfw ALIGNED_LFW \\
        --runs runs/compare [--max-minutes 170] [--seeds 1] [--rows arcface,arcface+unpg]
    python benchmarks/method_comparison.py report --protocol cpu --lfw ALIGNED_LFW --runs runs/compare
    python benchmarks/method_comparison.py list   --protocol cpu        # rows, configs and commands

Rows: ArcFace, CosFace, ElasticFace-Arc/Cos and their "+" variants (official defaults from
facerec.heads), each without and with UNPG; the headline rows (ArcFace and ElasticFace-Arc+, each
without and with UNPG) get three seeds, the others one unless --seeds says more.

Protocols (the budget is counted in epochs, so a row means the same work on any machine):
- cpu: MobileFaceNet-class (width 0.5, 128-d, the 112x112 input average-pooled to 56x56 inside the
  model), batch 128, the aligned pool, validation on LFW fold 5 every epoch; sized so that a row
  takes at most ~45 minutes on two idle cores.
- gpu: full MobileFaceNet (1.2 M parameters, 512-d) at 112x112, batch 256, bf16; for the device kit.
- gpu-r18: iresnet18 reference run (arcface and elasticface-arc+ with UNPG only).

`train` runs the missing rows one after another (or --parallel N at once on a GPU), each as
`python -m training ... --run-dir RUNS/<protocol>/<row>-s<seed>`, resuming a row that an earlier
session left unfinished (--max-minutes stops the current row at a checkpoint boundary, killed
and resumed later exactly as the kill-and-resume test proves). A finished row has `done.json`.
`report` evaluates each finished row's best-on-validation checkpoint with
benchmarks/evaluate_lfw.py (validation and LFW-H2 with flip, TAR at FAR on all cross-identity pairs)
and writes benchmarks/results/method_comparison_<protocol>.{json,md}.
Checkpoint selection and early stopping use validation only; LFW-H2 is read for the table, never
for a choice.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARGINS = ("arcface", "cosface", "elastic_arcface", "elastic_cosface", "elastic_arcface_plus",
           "elastic_cosface_plus")
LABELS = {"arcface": "ArcFace", "cosface": "CosFace", "elastic_arcface": "ElasticFace-Arc",
          "elastic_cosface": "ElasticFace-Cos", "elastic_arcface_plus": "ElasticFace-Arc+",
          "elastic_cosface_plus": "ElasticFace-Cos+"}
HEADLINE = ("arcface", "arcface+unpg", "elastic_arcface_plus", "elastic_arcface_plus+unpg")

PROTOCOLS: dict[str, dict] = {
    "cpu": {
        "model.name": "mobilefacenet",
        "model.kwargs": {"width": 0.5, "embedding_size": 128, "downsample": 2},
        "data.batch_size": 128, "data.workers": 1, "train.epochs": 8, "train.device": "cpu",
        "train.amp": "off", "train.checkpoint_every": 100, "train.log_every": 25,
        "val.patience": 0, "val.batch_size": 128, "val.max_pairs": 20000,
    },
    "gpu": {
        "model.name": "mobilefacenet", "model.kwargs": {},
        "data.batch_size": 256, "data.workers": 3, "train.epochs": 30, "train.device": "cuda",
        "train.amp": "bf16", "train.checkpoint_every": 100000, "train.log_every": 50,
        "val.patience": 0,
    },
    "gpu-r18": {
        "model.name": "iresnet18", "model.kwargs": {},
        "data.batch_size": 256, "data.workers": 6, "train.epochs": 30, "train.device": "cuda",
        "train.amp": "bf16", "train.checkpoint_every": 100000, "train.log_every": 50,
        "val.patience": 0,
    },
}
PROTOCOL_ROWS = {"gpu-r18": ("arcface", "elastic_arcface_plus+unpg")}


@dataclass(frozen=True)
class Row:
    margin: str
    unpg: bool
    seed: int

    @property
    def key(self) -> str:
        return self.margin + ("+unpg" if self.unpg else "")

    @property
    def name(self) -> str:
        return f"{self.key}-s{self.seed}"

    @property
    def label(self) -> str:
        return LABELS[self.margin] + (" + UNPG" if self.unpg else "")


def plan_rows(protocol: str, seeds: int = 1, only: list[str] | None = None) -> list[Row]:
    """Seed 0 of every row first (so an interrupted campaign has the whole table early), then the
    extra seeds: three for the headline rows, ``seeds`` for the others."""
    keys = [m + u for m in MARGINS for u in ("", "+unpg")]
    keys = list(PROTOCOL_ROWS.get(protocol, keys))
    if only:
        unknown = sorted(set(only) - set(keys))
        if unknown:
            raise SystemExit(f"unknown rows {unknown}; rows of {protocol}: {keys}")
        keys = [k for k in keys if k in only]
    rows = []
    for seed in range(max(3, seeds)):
        for key in keys:
            headline = key in HEADLINE and protocol not in PROTOCOL_ROWS  # r18: one reference run each
            if seed < (max(3, seeds) if headline else seeds):
                rows.append(Row(key.removesuffix("+unpg"), key.endswith("+unpg"), seed))
    return rows


def overrides(protocol: str, row: Row, pool: str, lfw: str, val_bin: str | None = None) -> list[str]:
    settings = dict(PROTOCOLS[protocol])
    settings.update({"loss.margin": row.margin, "loss.margin_kwargs": {}, "loss.unpg": row.unpg,
                     "train.seed": row.seed, "data.kind": "rec" if pool.endswith(".rec") or
                     Path(pool, "train.rec").exists() else "folder", "data.path": pool,
                     "train.progress": False})
    if val_bin:
        settings.update({"val.kind": "bin", "val.path": val_bin})
    else:
        settings.update({"val.kind": "lfw_fold", "val.path": lfw})
    return [f"{k}={json.dumps(v)}" for k, v in settings.items()]  # JSON is YAML: "off" stays a string


def train_command(protocol: str, row: Row, run_dir: Path, pool: str, lfw: str, val_bin: str | None,
                  python: str = sys.executable, extra: list[str] = ()) -> list[str]:
    """``extra``: further KEY=VALUE overrides applied last (a dry run: train.device=cpu, ...)."""
    cmd = [python, "-m", "training", "--config", "pool_mobilefacenet", "--run-dir", str(run_dir)]
    for o in [*overrides(protocol, row, pool, lfw, val_bin), *extra]:
        cmd += ["--set", o]
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step_*/meta.json")):
        cmd += ["--resume", "auto"]
    return cmd


def is_done(run_dir: Path) -> bool:
    return (run_dir / "done.json").exists()


@dataclass
class Job:
    row: Row
    run_dir: Path
    proc: subprocess.Popen
    log: object = field(repr=False)


def _start(args, row: Row) -> Job:
    run_dir = Path(args.runs) / args.protocol / row.name
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = train_command(args.protocol, row, run_dir, args.pool, args.lfw, args.val_bin, extra=args.set)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS=str(args.threads))
    log = open(run_dir / "train.out", "a")
    log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
    log.flush()
    print(f"[{row.name}] start: {shlex.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return Job(row, run_dir, proc, log)


def _finish(job: Job, started: float) -> None:
    job.log.close()
    rc = job.proc.returncode
    if rc == 0:
        (job.run_dir / "done.json").write_text(json.dumps({
            "row": job.row.name, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "last_session_seconds": round(time.time() - started, 1)}))
        print(f"[{job.row.name}] done", flush=True)
    else:
        print(f"[{job.row.name}] stopped with exit code {rc}; see {job.run_dir / 'train.out'}", flush=True)


def cmd_train(args) -> int:
    rows = [r for r in plan_rows(args.protocol, args.seeds, args.rows)
            if not is_done(Path(args.runs) / args.protocol / r.name)]
    print(f"{len(rows)} rows to train: {[r.name for r in rows]}", flush=True)
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else None
    running: list[tuple[Job, float]] = []
    failed = 0
    while rows or running:
        while rows and len(running) < args.parallel and (deadline is None or time.time() < deadline):
            running.append((_start(args, rows.pop(0)), time.time()))
        if not running:
            break
        for job, started in list(running):
            if job.proc.poll() is not None:
                _finish(job, started)
                failed += job.proc.returncode != 0
                running.remove((job, started))
        if deadline is not None and time.time() >= deadline:
            for job, started in running:  # a kill at any step is resumable (tests/test_checkpoint_resume.py)
                os.killpg(job.proc.pid, signal.SIGKILL)
                job.proc.wait()
                print(f"[{job.row.name}] out of time: resumes next session", flush=True)
                job.log.close()
            running = []
            break
        time.sleep(2)  # polling subprocesses, not synchronising tests
    return 1 if failed else 0


def best_checkpoint(run_dir: Path) -> Path | None:
    best = run_dir / "checkpoints" / "best.json"
    if not best.exists():
        return None
    return run_dir / "checkpoints" / json.loads(best.read_text())["dir"]


def aggregate(results: dict[str, dict]) -> list[dict]:
    """Mean and standard deviation over seeds of each row's metrics (population std, n-1 when n>1)."""
    by_key: dict[str, list[dict]] = {}
    for name, r in results.items():
        by_key.setdefault(name.rsplit("-s", 1)[0], []).append(r)
    table = []
    for key, runs in by_key.items():
        entry: dict = {"row": key, "seeds": len(runs)}
        for metric in ("val_accuracy", "h2_accuracy", "h2_tar_1e-2", "val_tar_1e-2"):
            values = [r[metric] for r in runs if r.get(metric) is not None]
            entry[metric] = statistics.fmean(values) if values else None
            entry[metric + "_std"] = statistics.stdev(values) if len(values) > 1 else None
        table.append(entry)
    order = {m + u: i for i, (m, u) in enumerate((m, u) for m in MARGINS for u in ("", "+unpg"))}
    return sorted(table, key=lambda e: order.get(e["row"], 99))


def _tar(report: dict, far: float) -> float | None:
    for t in report["tar_at_far"]:
        if abs(t["far"] - far) < 1e-12 and t.get("supported", True):
            return t["tar"]
    return None


def check_overrides(run_dir: Path, settings: list[str]) -> None:
    """Refuse to label a run with overrides (``key=value``) it was not trained with."""
    import yaml

    config = run_dir / "config.yaml"
    if not settings or not config.exists():
        return
    trained = yaml.safe_load(config.read_text())
    for item in settings:
        key, _, value = item.partition("=")
        actual = trained
        for part in key.split("."):
            actual = actual.get(part) if isinstance(actual, dict) else None
        if actual != yaml.safe_load(value):
            raise SystemExit(f"{run_dir}: trained with {key}={actual!r}, not {value} (--set); wrong --runs?")


def _stale(eval_file: Path) -> bool:
    """An evaluation written before the validation folds were stratified (session 6) is recomputed."""
    return json.loads(eval_file.read_text())["validation"].get("folds") != "stratified"


def row_command(args, row: Row, run_dir: Path) -> str:
    """The command that trains this row (all its seeds), with the pool and LFW tree it was trained on."""
    pool, lfw = args.pool, args.lfw
    config = run_dir / "config.yaml"
    if config.exists():
        import yaml

        trained = yaml.safe_load(config.read_text())
        pool = trained.get("data", {}).get("path") or pool
        lfw = trained.get("val", {}).get("path") or lfw
    cmd = ["python", "benchmarks/method_comparison.py", "train", "--protocol", args.protocol,
           "--pool", pool or "POOL", "--lfw", lfw or "LFW", "--runs", str(args.runs), "--rows", row.key]
    for x in args.set:
        cmd += ["--set", x]
    return shlex.join(cmd)


def cmd_report(args) -> int:
    if args.set and not args.tag:
        raise SystemExit("report --set labels an ablation: give --tag too, so the main table is not overwritten")
    root = Path(args.runs) / args.protocol
    results: dict[str, dict] = {}
    for row in plan_rows(args.protocol, args.seeds, args.rows):
        run_dir = root / row.name
        if args.packed:  # best checkpoints packed by the device kit: <packed>/<row>.pt
            ckpt = Path(args.packed) / f"{row.name}.pt"
            if not ckpt.exists():
                continue
            out, stamp = Path(args.packed) / "eval", ckpt
        else:
            ckpt = best_checkpoint(run_dir)
            if not is_done(run_dir) or ckpt is None:
                continue
            out, stamp = run_dir / "eval", run_dir / "done.json"
            check_overrides(run_dir, args.set)
        file = out / f"eval_lfw_{row.name}.json"
        if not file.exists() or file.stat().st_mtime < stamp.stat().st_mtime or _stale(file):
            subprocess.run([sys.executable, str(REPO / "benchmarks" / "evaluate_lfw.py"), str(ckpt),
                            "--aligned-lfw", args.lfw, "--tag", row.name, "--out", str(out)]
                           + (["--data", args.data] if args.data else []), check=True, cwd=REPO)
        ev = json.loads(file.read_text())
        v, t = ev["validation"], ev["lfw_h2"]
        results[row.name] = {
            "label": row.label, "checkpoint": str(ckpt),
            "val_accuracy": v["accuracy_mean"], "val_accuracy_fold_std": v["accuracy_std"],
            "val_tar_1e-2": _tar(v, 1e-2), "val_tar_1e-3": _tar(v, 1e-3),
            "h2_accuracy": t["accuracy_mean"], "h2_accuracy_fold_std": t["accuracy_std"],
            "h2_tar_1e-2": _tar(t, 1e-2), "h2_tar_1e-3": _tar(t, 1e-3),
            "command": row_command(args, row, run_dir),
            "evaluate_command": shlex.join(["python", "benchmarks/evaluate_lfw.py", str(ckpt), "--aligned-lfw",
                                            args.lfw, "--tag", row.name, "--out", str(out)]
                                           + (["--data", args.data] if args.data else [])),
        }
    table = aggregate(results)
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    stem = f"method_comparison_{args.protocol}" + (f"_{args.tag}" if args.tag else "")
    (res / f"{stem}.json").write_text(
        json.dumps({"protocol": args.protocol, "settings": PROTOCOLS[args.protocol], "extra": args.set,
                    "runs": results, "table": table}, indent=1))

    def pct(e, k):
        if e[k] is None:
            return "–"
        return f"{100 * e[k]:.2f}" + (f" ± {100 * e[k + '_std']:.2f}" if e[k + "_std"] is not None else "")

    lines = [f"# Method comparison, protocol `{args.protocol}`", "",
             f"Settings: `{json.dumps(PROTOCOLS[args.protocol])}`; pool `{args.pool or '(see runs)'}`.",
             *([f"Extra overrides of every row: `{' '.join('--set ' + x for x in args.set)}`."] if args.set else []),
             "Accuracy in %, mean ± std over seeds; TAR at FAR 1e-2 on all cross-identity pairs.",
             "Report: `" + shlex.join(["python", "benchmarks/method_comparison.py", "report", "--protocol",
                                       args.protocol, "--lfw", args.lfw, "--runs", str(args.runs),
                                       *(["--data", args.data] if args.data else []),
                                       *(["--packed", args.packed] if args.packed else []),
                                       *(["--seeds", str(args.seeds)] if args.seeds != 1 else []),
                                       *(["--rows", ",".join(args.rows)] if args.rows else []),
                                       *(["--tag", args.tag] if args.tag else []),
                                       *[a for x in args.set for a in ("--set", x)]]) + "`.", "",
             "| method | seeds | validation acc | validation TAR@1e-2 | LFW-H2 acc | LFW-H2 TAR@1e-2 |",
             "|---|---|---|---|---|---|"]
    for e in table:
        label = LABELS[e["row"].removesuffix("+unpg")] + (" + UNPG" if e["row"].endswith("+unpg") else "")
        lines.append(f"| {label} | {e['seeds']} | {pct(e, 'val_accuracy')} | {pct(e, 'val_tar_1e-2')} | "
                     f"{pct(e, 'h2_accuracy')} | {pct(e, 'h2_tar_1e-2')} |")
    lines += ["", "Each run (accuracy ± std over the folds: 10 stratified validation folds, 5 LFW-H2 folds; "
              "TAR at FAR 1e-2 / 1e-3 on all cross-identity pairs):", "",
              "| run | checkpoint | validation acc | validation TAR | LFW-H2 acc | LFW-H2 TAR |",
              "|---|---|---|---|---|---|"]

    def fold(r, k):
        return f"{100 * r[k]:.2f} ± {100 * r[k + '_fold_std']:.2f}"

    def tars(r, p):
        return " / ".join("–" if r[f"{p}_tar_{f}"] is None else f"{100 * r[f'{p}_tar_{f}']:.2f}"
                          for f in ("1e-2", "1e-3"))

    for name, r in sorted(results.items()):
        lines.append(f"| {name} | {Path(r['checkpoint']).name} | {fold(r, 'val_accuracy')} | {tars(r, 'val')} | "
                     f"{fold(r, 'h2_accuracy')} | {tars(r, 'h2')} |")
    lines += ["", "Commands (a row key trains all its seeds; `list` prints each run's exact "
              "`python -m training` line):", ""]
    for key in dict.fromkeys(n.rsplit("-s", 1)[0] for n in results):
        first = next(r for n, r in results.items() if n.rsplit("-s", 1)[0] == key)
        lines.append(f"- `{key}`: `{first['command']}`")
    missing = [r.name for r in plan_rows(args.protocol, args.seeds, args.rows) if r.name not in results]
    if missing:
        lines += ["", f"Not yet trained ({len(missing)}): " + ", ".join(missing)]
    (res / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def cmd_list(args) -> int:
    for row in plan_rows(args.protocol, args.seeds, args.rows):
        run_dir = Path(args.runs) / args.protocol / row.name
        state = "done" if is_done(run_dir) else ("started" if run_dir.exists() else "todo")
        cmd = train_command(args.protocol, row, run_dir, args.pool or "POOL", args.lfw or "LFW", args.val_bin,
                            python="python", extra=args.set)
        print(f"{row.name:32s} {state:8s} {shlex.join(cmd)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("train", "report", "list"))
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cpu")
    parser.add_argument("--pool", help="aligned pool tree (facerec align --preset pool [--pins DIR]) or .rec folder")
    parser.add_argument("--lfw", help="aligned LFW tree (facerec align --preset lfw)")
    parser.add_argument("--val-bin", help="validate on this .bin instead of the aligned LFW tree (device kit)")
    parser.add_argument("--data", help="shared data root (default FACEREC_DATA or ../shared/data)")
    parser.add_argument("--runs", default="runs/compare", help="where the rows' run folders live")
    parser.add_argument("--packed", help="report: read <packed>/<row>.pt (device kit output) instead of --runs")
    parser.add_argument("--rows", type=lambda s: s.split(","), help="only these rows, e.g. arcface,cosface+unpg")
    parser.add_argument("--seeds", type=int, default=1, help="seeds for non-headline rows (headline: 3)")
    parser.add_argument("--parallel", type=int, default=1, help="rows trained at once (GPU)")
    parser.add_argument("--threads", type=int, default=2, help="OMP threads per training process")
    parser.add_argument("--max-minutes", type=float, help="stop (resumably) after this long")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"),
                        help="report: where the table goes (default benchmarks/results)")
    parser.add_argument("--tag", help="report: write method_comparison_<protocol>_<tag>.{json,md} (an ablation "
                        "with --set, kept apart from the main table)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra training override for every row (e.g. a dry run: train.max_steps=2)")
    args = parser.parse_args(argv)
    if args.action == "train" and not (args.pool and (args.lfw or args.val_bin)):
        parser.error("train needs --pool and --lfw (or --val-bin)")
    if args.action == "report" and not args.lfw:
        parser.error("report needs --lfw (the aligned LFW tree)")
    return {"train": cmd_train, "report": cmd_report, "list": cmd_list}[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
