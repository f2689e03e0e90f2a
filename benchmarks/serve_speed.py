"""Requests/s and p50/p99 latency of POST /v1/verify at 1, 8 and 32 concurrent clients, against a
real ``facerec-serve`` process on loopback.

    python benchmarks/serve_speed.py                               # random-init vit_tiny_fiqa, CPU
    python benchmarks/serve_speed.py --model models/default --tag trained
    python benchmarks/serve_speed.py --device cuda --backend torch --tag gpu

Each request is a multipart verify of two LFW sample photos (250x250 JPEG), so every number
includes decoding, MTCNN detection, alignment, the micro-batched model call, OOD scoring and HTTP.
Clients are asyncio tasks in this process sending back to back; each level first sends a few
warm-up requests, then a bounded number (``--requests``, at least 4 per client). The server and the
clients share the machine's cores, as the load average recorded at the start does: on a shared
2-core machine the numbers are a floor. Writes benchmarks/results/serve_speed[_<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
KEY = "benchmark-key-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pairs() -> list[tuple[bytes, bytes]]:
    photos = sorted((REPO / "tests" / "data" / "lfw_sample").glob("*/*.jpg"))
    data = [p.read_bytes() for p in photos]
    return [(data[i], data[(i * 7 + 3) % len(data)]) for i in range(len(data))]


async def _level(base: str, clients: int, total: int, pairs, warmup: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        async def one(i: int) -> tuple[float, int]:
            a, b = pairs[i % len(pairs)]
            start = time.perf_counter()
            r = await client.post("/v1/verify", files={"image_a": a, "image_b": b}, headers={"X-API-Key": KEY})
            return time.perf_counter() - start, r.status_code

        for i in range(warmup):
            await one(i)
        counter = iter(range(total))
        latencies, statuses = [], {}

        async def worker():
            for i in counter:
                seconds, status = await one(i)
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(seconds)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {
        "clients": clients, "requests": total, "ok": len(latencies), "statuses": statuses,
        "seconds": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "mean_ms": round(float(ms.mean()), 1),
    }


def _markdown(report: dict) -> str:
    s = report["server"]
    lines = [
        f"# Serving speed: POST /v1/verify ({report['tag'] or 'default'})",
        "",
        (f"Model {s['model']} ({s['contract_id']}), backend {s['backend']} on {s['device']} "
         f"({', '.join(s['providers'])}); {report['machine']['cpu']}, {report['machine']['cores']} cores, "
         f"load average at start {report['machine']['loadavg']}. Clients in the same machine over loopback; "
         f"two 250x250 JPEGs per request (decode + detect + align + model + OOD for each)."),
        "",
        "| clients | requests | requests/s | p50 ms | p99 ms | non-200 |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["levels"]:
        bad = {k: v for k, v in r["statuses"].items() if str(k) != "200"} or "-"
        lines.append(f"| {r['clients']} | {r['requests']} | {r['requests_per_s']} | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {bad} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="exported model folder (default: a random-init vit_tiny_fiqa)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=64, help="requests per level (at least 4 per client)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if model is None:
        sys.path.insert(0, str(REPO))
        from service.testing import make_random_model

        torch_needed = args.backend == "torch" or args.device != "cpu"
        model = str(make_random_model(Path(tmp.name) / "model", torch_artifact=torch_needed))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "FACEREC_API_KEYS": KEY, "FACEREC_MODEL": model, "FACEREC_DEVICE": args.device,
           "FACEREC_BACKEND": args.backend}
    log_path = Path(tmp.name) / "serve.log"
    loadavg = os.getloadavg()
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("server did not become ready:\n" + log_path.read_text())
            try:
                if httpx.get(f"{base}/v1/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        models = httpx.get(f"{base}/v1/models", headers={"X-API-Key": KEY}, timeout=30).json()
        pairs = _pairs()
        levels = []
        for c in (int(v) for v in args.clients.split(",")):
            total = max(args.requests, 4 * c)
            levels.append(asyncio.run(_level(base, c, total, pairs, args.warmup)))
            print(json.dumps(levels[-1]), flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    from facerec.sysinfo import cpu_name

    cpu = cpu_name()
    report = {
        "tag": args.tag,
        "server": {"model": f"{models['contract']['model_name']} {models['contract']['model_version']}",
                   "contract_id": models["contract_id"], "backend": models["model"]["backend"],
                   "device": models["device"]["active"], "providers": models["providers"],
                   "limits": models["limits"]},
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "loadavg": [round(v, 2) for v in loadavg],
                    "python": platform.python_version()},
        "levels": levels,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "serve_speed" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
