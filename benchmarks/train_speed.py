"""Training speed: our trainer's step vs a plain mixed-precision eager PyTorch loop.

For each backbone (iresnet50, vit_s) x UNPG (off, on) x implementation, on random data already on
the device (this measures the step, not the data loader): images/s, achieved TFLOP/s (FLOPs of one
forward + backward counted with torch.utils.flop_counter, per step) and peak memory.

  baseline: fp16 autocast + GradScaler, foreach SGD, clip_grad_norm_, eager, NCHW (what
            arcface_torch does, with facerec's model and FaceRecognitionLoss);
  trainer:  training.trainer.Trainer.train_step: bf16 where supported, fused SGD with the on-device
            non-finite guard, channels_last for CNNs, no host sync; ``--compile`` adds torch.compile.

GPU:  python benchmarks/train_speed.py                       (batch 512, 93,431 classes)
CPU smoke: python benchmarks/train_speed.py --device cpu --batch 8 --classes 1000 --steps 2
Writes benchmarks/results/train_speed_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from facerec.losses import FaceRecognitionLoss
from facerec.models import create_model

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB -> GiB)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def count_flops(step_fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step_fn()
    return int(counter.get_total_flops())


def timed(step_fn, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step_fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    sync(device)
    return time.perf_counter() - start


def baseline_step_fn(model_name, classes, batch, unpg, device, images, labels):
    model = create_model(model_name).to(device).train()
    loss_fn = FaceRecognitionLoss(classes, model.embedding_size, margin="arcface", unpg=unpg).to(device)
    params = list(model.parameters()) + list(loss_fn.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    def step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            out = model(images)
            loss = loss_fn(out.embedding, labels).total
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return step, model, loss_fn


def trainer_step_fn(model_name, classes, batch, unpg, device, images, labels, compile_model, run_dir):
    from training.config import Config
    from training.trainer import Trainer

    cfg = Config.model_validate({
        "run_dir": str(run_dir),
        "model": {"name": model_name, "compile": compile_model},
        "loss": {"margin": "arcface", "unpg": unpg},
        "data": {"kind": "synthetic", "num_classes": classes, "images_per_class": 1,
                 "batch_size": batch, "workers": 0},
        "train": {"device": device.type, "epochs": 1, "progress": False},
    })
    trainer = Trainer(cfg)
    x = images.contiguous(memory_format=torch.channels_last) if trainer.channels_last else images
    trainer.model.train()

    def step():
        trainer.train_step(x, labels)

    return step, trainer


def run_case(args, model_name, unpg, impl, device, flops_cache) -> dict:
    reset_memory(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(args.batch, 3, 112, 112, generator=g).clamp_(-1, 1).to(device)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        if impl == "baseline":
            step, model, loss_fn = baseline_step_fn(model_name, args.classes, args.batch, unpg, device,
                                                    images, labels)
        else:
            step, trainer = trainer_step_fn(model_name, args.classes, args.batch, unpg, device, images,
                                            labels, args.compile, tmp)
        key = (model_name, unpg)
        if key not in flops_cache:  # the same model and loss: count once, eager
            flops_cache[key] = count_flops(step)
        seconds = timed(step, args.steps, args.warmup, device)
    flops = flops_cache[key]
    return {
        "model": model_name, "unpg": unpg, "impl": impl + ("+compile" if impl == "trainer" and args.compile else ""),
        "batch": args.batch, "classes": args.classes, "steps": args.steps,
        "images_per_s": args.batch * args.steps / seconds,
        "tflops_per_s": flops * args.steps / seconds / 1e12,
        "gflop_per_step": flops / 1e9,
        "peak_memory_gib": peak_memory_gib(device),
    }


def markdown(rows: list[dict], env: dict) -> str:
    lines = [f"# Training speed ({env['device_name']}, torch {env['torch']})", "",
             f"batch {rows[0]['batch']}, {rows[0]['classes']:,} classes, ArcFace loss (s 64, m 0.5; UNPG as "
             f"the column says), {rows[0]['steps']} timed steps. "
             f"Command: `{env['command']}`", "",
             "| model | UNPG | implementation | images/s | TFLOP/s | GFLOP/step | peak memory (GiB) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'on' if r['unpg'] else 'off'} | {r['impl']} | "
                     f"{r['images_per_s']:,.1f} | {r['tflops_per_s']:.2f} | {r['gflop_per_step']:,.1f} | "
                     f"{r['peak_memory_gib']:.2f} |")
    if env["device"] == "cpu":
        lines += ["", "CPU run: a smoke test of the script, not a speed result; memory is the process peak RSS."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--classes", type=int, default=93431)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=None, help="default: 5 on CUDA (30 with --compile), 1 on CPU")
    parser.add_argument("--models", default="iresnet50,vit_s")
    parser.add_argument("--unpg", default="off,on")
    parser.add_argument("--impl", default="baseline,trainer")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone in the trainer")
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/train_speed_<device>)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.warmup is None:
        args.warmup = (30 if args.compile else 5) if device.type == "cuda" else 1
    env = {"device": device.type, "torch": torch.__version__, "python": platform.python_version(),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "command": "python benchmarks/train_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    rows, flops_cache = [], {}
    for model_name in args.models.split(","):
        for unpg in [u == "on" for u in args.unpg.split(",")]:
            for impl in args.impl.split(","):
                row = run_case(args, model_name, unpg, impl, device, flops_cache)
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out) if args.out else RESULTS / f"train_speed_{device.type}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(markdown(rows, env))
    print(markdown(rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
