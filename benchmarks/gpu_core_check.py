"""GPU checks of the core library: AMP correctness of every margin + UNPG + FIQA, fused SDPA in
the ViTs, and training-step throughput of iresnet50 / vit_s at batch 512 with 93,431 classes.

Usage (on a CUDA machine): python benchmarks/gpu_core_check.py --out benchmarks/results
Writes gpu_core_check.json and gpu_core_check.md. Timings are of this library's own step (model
forward + loss + backward + SGD step), not yet of the full trainer (data loading excluded).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from facerec.heads import list_margins
from facerec.losses import FaceRecognitionLoss
from facerec.models import create_model


def amp_agreement(device, classes: int = 93431, batch: int = 512, dim: int = 512) -> list[dict]:
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    emb = torch.randn(batch, dim, device=device, generator=g)
    labels = torch.randint(0, classes, (batch,), device=device, generator=g)
    quality = torch.randn(batch, device=device, generator=g)
    for margin in list_margins():
        for unpg in (False, True):
            ref_loss = FaceRecognitionLoss(classes, dim, margin=margin, unpg=unpg).to(device).train()
            state = copy.deepcopy(ref_loss.state_dict())  # includes the generators' extra state
            grads, values = {}, {}
            for dtype in (None, torch.bfloat16, torch.float16):
                loss = FaceRecognitionLoss(classes, dim, margin=margin, unpg=unpg).to(device).train()
                loss.load_state_dict(state)
                e = emb.clone().requires_grad_()
                q = quality.clone().requires_grad_()
                with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                    out = loss(e, labels, q)
                out.total.backward()
                key = str(dtype).replace("torch.", "") if dtype else "fp32"
                values[key] = out.total.item()
                grads[key] = e.grad.flatten()
            row = {"margin": margin, "unpg": unpg, "loss_fp32": values["fp32"]}
            for key in ("bfloat16", "float16"):
                row[f"loss_{key}"] = values[key]
                row[f"rel_diff_{key}"] = abs(values[key] - values["fp32"]) / abs(values["fp32"])
                row[f"grad_cos_{key}"] = F.cosine_similarity(grads[key], grads["fp32"], dim=0).item()
                row[f"finite_{key}"] = bool(torch.isfinite(grads[key]).all())
            rows.append(row)
            print(row, flush=True)
    return rows


def extreme_cosines(device) -> dict:
    cos = torch.tensor([[1.0, 0.2], [-1.0, 0.3], [0.5, 1.0], [0.1, -1.0]], device=device)
    out = {}
    for margin in list_margins():
        from facerec.heads import create_margin

        for dtype in (torch.float16, torch.bfloat16):
            c = cos.to(dtype).requires_grad_()
            create_margin(margin).train()(c, torch.tensor([0, 0, 1, 1], device=device)).sum().backward()
            out[f"{margin}/{dtype}"] = bool(torch.isfinite(c.grad).all())
    return out


def flash_attention_used(device) -> dict:
    model = create_model("vit_s_fiqa").to(device).train()
    x = torch.randn(64, 3, 112, 112, device=device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x).embedding.float().sum().backward()
    names = {e.key for e in prof.key_averages()}
    attention = sorted(n for n in names if any(k in n.lower() for k in ("flash", "fmha", "efficient_attention", "cudnn_sdpa", "sdpa")))
    return {"attention_kernels": attention[:10], "fused": bool(attention)}


def step_throughput(device, name: str, unpg: bool, batch: int = 512, classes: int = 93431,
                    steps: int = 15, warmup: int = 5) -> dict:
    torch.cuda.reset_peak_memory_stats()
    model = create_model(name).to(device).train()
    if name.startswith("iresnet"):
        model = model.to(memory_format=torch.channels_last)
    loss_fn = FaceRecognitionLoss(classes, model.embedding_size, margin="elastic_arcface_plus",
                                  unpg=unpg).to(device).train()
    params = list(model.parameters()) + list(loss_fn.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True)
    x = torch.randn(batch, 3, 112, 112, device=device)
    if name.startswith("iresnet"):
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
            losses = loss_fn(out.embedding, y, out.quality)
        opt.zero_grad(set_to_none=True)
        losses.total.backward()
        opt.step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"model": name, "unpg": unpg, "batch": batch, "classes": classes,
            "images_per_s": round(steps * batch / seconds, 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "loss_last": round(losses.total.item(), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "python": platform.python_version()}
    report["extreme_cosines_finite"] = extreme_cosines(device)
    report["flash"] = flash_attention_used(device)
    print(report, flush=True)
    report["amp"] = amp_agreement(device)
    report["throughput"] = []
    for name in ("iresnet50", "vit_s", "vit_s_fiqa"):
        for unpg in (False, True):
            row = step_throughput(device, name, unpg)
            print(row, flush=True)
            report["throughput"].append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_core_check.json").write_text(json.dumps(report, indent=2))
    lines = [f"# GPU core check ({report['gpu']}, torch {report['torch']})", "",
             "| model | UNPG | images/s | peak GiB |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['unpg']} | {r['images_per_s']} | {r['peak_memory_gib']} |"
              for r in report["throughput"]]
    lines += ["", "| margin | UNPG | rel. loss diff bf16 | grad cos bf16 | rel. loss diff fp16 | grad cos fp16 |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['margin']} | {r['unpg']} | {r['rel_diff_bfloat16']:.2e} | {r['grad_cos_bfloat16']:.5f} | "
              f"{r['rel_diff_float16']:.2e} | {r['grad_cos_float16']:.5f} |" for r in report["amp"]]
    (out / "gpu_core_check.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
