"""Images per second of the inference backends (model only: aligned uint8 crops in, outputs out).

    python benchmarks/runtime_speed.py                         # CPU: onnxruntime and torch, both models
    python benchmarks/runtime_speed.py --device cuda --backends torch --amp fp16 --tag gpu
    python benchmarks/runtime_speed.py --folder models/default --backends onnxruntime --tag default

``--folder DIR`` (repeatable) times a model folder as shipped (its fp32 graph; its torch artefact when
it has one) instead of the random registry models, on crops of its own input size.

Models are randomly initialised (speed does not depend on the weights) and exported through the
normal export path (parity-checked). Each (backend, model, batch) is warmed up, then run for at least
``--seconds``; the table gives images/s and the median milliseconds per batch. The input is uint8
crops, so the normalisation each backend performs is included, as it is in serving. Writes
benchmarks/results/runtime_speed[_<tag>].json and .md. The load average at the start is recorded: on
a shared machine other processes slow every number down.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from facerec.sysinfo import cpu_name

ROOT = Path(__file__).resolve().parent


def time_backend(backend, batch: int, seconds: float, size: int = 112) -> dict:
    crops = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    for _ in range(2):  # first calls allocate / pick kernels
        backend.run(crops)
    runs: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(runs) < 3:
        t = time.perf_counter()
        backend.run(crops)
        runs.append(time.perf_counter() - t)
    total = sum(runs)
    return {
        "batch": batch,
        "runs": len(runs),
        "images_per_s": round(batch * len(runs) / total, 1),
        "ms_per_batch_median": round(1000 * statistics.median(runs), 2),
    }


def build_backends(name: str, kinds: list[str], args, tmp: Path) -> dict:
    import torch

    from facerec.export import export_bundle
    from facerec.runtime import OnnxRuntimeBackend, TorchBackend

    torch.manual_seed(0)
    from facerec.models import create_model

    model = create_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_bundle(model, tmp / name, model_name=name, fp16=False, torch_artifact=True, version="bench")
    backends = {}
    if "onnxruntime" in kinds:
        backends["onnxruntime"] = OnnxRuntimeBackend(
            tmp / name / f"{name}.onnx", device=args.device, threads=args.threads
        )
    if "torch" in kinds:
        backends["torch"] = TorchBackend(
            tmp / name / f"{name}.pt",
            device=args.device,
            amp=args.amp,
            compile=args.compile,
            threads=args.threads,
        )
    return backends


def folder_backends(folder: str, kinds: list[str], args) -> dict:
    """The shipped files of a model folder: its fp32 graph, and its torch artefact if it has one."""
    from facerec.bundle import ModelBundle
    from facerec.runtime import OnnxRuntimeBackend, TorchBackend

    model = ModelBundle(folder)
    backends = {}
    if "onnxruntime" in kinds:
        backends["onnxruntime"] = OnnxRuntimeBackend(model.graph(), device=args.device, threads=args.threads)
    artefacts = sorted(model.folder.glob("*.pt"))
    if "torch" in kinds and len(artefacts) == 1:
        backends["torch"] = TorchBackend(artefacts[0], device=args.device, amp=args.amp, compile=args.compile,
                                         threads=args.threads)
    return backends


def to_markdown(report: dict) -> str:
    env = report["environment"]
    threads = report["options"]["threads"] or "library default"
    lines = [
        "# Inference backend speed (model only)",
        "",
        (
            f"Device `{report['device']}`; CPU: {env['cpu']} ({env['cpu_count']} cores visible), "
            f"load average at start {env['load_average']}; torch {env['torch']}, onnxruntime "
            f"{env['onnxruntime']}, threads per backend: {threads}, "
            f"{report['seconds']} s per cell. Input: aligned uint8 crops "
            "(normalisation included). Registry models: random weights; folders: as shipped."
        ),
        "",
        "| backend | provider | model | input | batch | images/s | ms / batch (median) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['backend']} | {r['provider']} | {r['model']} | {r.get('input_size', 112)} | {r['batch']} "
            f"| {r['images_per_s']} "
            f"| {r['ms_per_batch_median']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help="registry models, randomly initialised "
                        "(default: mobilefacenet vit_tiny_fiqa, unless --folder is given)")
    parser.add_argument("--folder", action="append", default=[], help="a model folder to time as shipped")
    parser.add_argument(
        "--backends", nargs="+", default=["onnxruntime", "torch"], choices=["onnxruntime", "torch"]
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum timed seconds per cell")
    parser.add_argument("--device", default="cpu", help="FACEREC_DEVICE value for the backends")
    parser.add_argument("--amp", choices=["fp16", "bf16"], help="torch autocast (CUDA only)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the torch backend")
    parser.add_argument("--threads", type=int, help="CPU threads per backend (default: the libraries' own)")
    parser.add_argument("--tag", help="suffix of the result files")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args(argv)

    import onnxruntime
    import torch

    report = {
        "device": args.device,
        "seconds": args.seconds,
        "environment": {
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "load_average": [round(v, 2) for v in os.getloadavg()],
            "torch_threads": args.threads or torch.get_num_threads(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "options": {"amp": args.amp, "compile": args.compile, "threads": args.threads},
        "results": [],
    }
    models = args.models if args.models is not None else ([] if args.folder else ["mobilefacenet", "vit_tiny_fiqa"])
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(name, build_backends(name, args.backends, args, Path(tmp))) for name in models]
        runs += [(folder, folder_backends(folder, args.backends, args)) for folder in args.folder]
        for name, backends in runs:
            for kind, backend in backends.items():
                for batch in args.batches:
                    row = {
                        "backend": kind,
                        "provider": backend.provider,
                        "model": name,
                        "input_size": backend.contract.input_size,
                        **time_backend(backend, batch, args.seconds, backend.contract.input_size),
                    }
                    report["results"].append(row)
                    print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "runtime_speed" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(to_markdown(report))
    print(f"wrote {out / stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
