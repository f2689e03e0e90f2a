"""Requests/s and p50/p99 latency of POST /v1/verify at 1, 8 and 32 concurrent clients, and the
images/s of POST /v1/embed/batch, against a real ``facerec-serve`` process on loopback.

    python benchmarks/serve_speed.py                               # random-init vit_tiny_fiqa, CPU
    python benchmarks/serve_speed.py --model models/default --tag trained
    python benchmarks/serve_speed.py --device cuda --backend torch --tag gpu
    python benchmarks/serve_speed.py --baseline-repo ../main --tag cpu_api   # before / after

Each verify request is a multipart verify of two LFW sample photos (250x250 JPEG), so every number
includes decoding, face detection, alignment, the micro-batched model call, OOD scoring and HTTP.
Each batch request sends ``--batch-images`` of those photos to /v1/embed/batch. Clients are asyncio
tasks in this process sending back to back; each level first sends a few warm-up requests, then a
bounded number (``--requests``, at least 4 per client).

The server and the clients share the machine's cores, and on a shared machine other jobs take their
share too, so requests/s is a floor that moves with the load. The server's own CPU time per request
(``cpu_ms``: user + system time of the server process over the level, divided by the requests)
moves much less with the load: it says what a request costs, where requests/s says what the
machine had to spare. ``--baseline-repo`` starts a second server from another checkout (the same
model, settings and Python) and runs every level on it immediately before this checkout's, so the
two are compared under the same conditions. Writes benchmarks/results/serve_speed[_<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _photos() -> list[bytes]:
    return [p.read_bytes() for p in sorted((REPO / "tests" / "data" / "lfw_sample").glob("*/*.jpg"))]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _stats(latencies: list[float], statuses: dict, wall: float, units: int, cpu: float, **extra) -> dict:
    ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    ok = len(latencies)
    return {
        **extra, "ok": ok, "statuses": statuses, "seconds": round(wall, 3),
        "requests_per_s": round(ok / wall, 2), "units_per_s": round(units / wall, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "mean_ms": round(float(ms.mean()), 1), "cpu_ms": round(1000 * cpu / max(ok, 1), 1),
    }


async def _level(server: Server, clients: int, total: int, make, units_per_request: int, warmup: int) -> dict:
    """``total`` requests from ``clients`` concurrent clients; ``make(client, i)`` sends request i."""
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=server.base, timeout=300, limits=limits,
                                 headers={"X-API-Key": KEY}) as client:
        async def one(i: int) -> tuple[float, int]:
            start = time.perf_counter()
            r = await make(client, i)
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

        cpu0, start = _cpu_s(server.proc.pid), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall, cpu = time.perf_counter() - start, _cpu_s(server.proc.pid) - cpu0
    return _stats(latencies, statuses, wall, len(latencies) * units_per_request, cpu, server=server.name,
                  clients=clients, requests=total)


def _verify(photos):
    async def make(client, i):
        a, b = photos[i % len(photos)], photos[(i * 7 + 3) % len(photos)]
        return await client.post("/v1/verify", files={"image_a": a, "image_b": b})
    return make


def _batch(photos, n):
    async def make(client, i):
        parts = [("images", photos[(i * n + k) % len(photos)]) for k in range(n)]
        return await client.post("/v1/embed/batch", files=parts)
    return make


class Server:
    """``python -m service`` from ``repo`` on a free port (this interpreter, the given settings)."""

    def __init__(self, repo: Path, model: str, args, log_dir: Path, name: str) -> None:
        import httpx

        self.repo, self.name = repo, name
        self.base = f"http://127.0.0.1:{_free_port()}"
        env = {**os.environ, "FACEREC_API_KEYS": KEY, "FACEREC_MODEL": model, "FACEREC_DEVICE": args.device,
               "FACEREC_BACKEND": args.backend}
        env.pop("PYTHONPATH", None)  # the checkout's own packages, from its folder
        self.log = log_dir / f"serve_{name}.log"
        with open(self.log, "wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "--port", self.base.rsplit(":", 1)[1], "--log-level", "warning"],
                cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise SystemExit(f"server {name} did not become ready:\n" + self.log.read_text())
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.base}/v1/health/ready", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)
        self.models = httpx.get(f"{self.base}/v1/models", headers={"X-API-Key": KEY}, timeout=30).json()
        probe = httpx.post(f"{self.base}/v1/embed/batch", headers={"X-API-Key": KEY}, timeout=60, json={})
        self.has_batch = probe.status_code != 404
        self.commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                     text=True).stdout.strip() or None

    def describe(self) -> dict:
        m = self.models
        return {"repo": str(self.repo), "commit": self.commit,
                "model": f"{m['contract']['model_name']} {m['contract']['model_version']}",
                "contract_id": m["contract_id"], "backend": m["model"]["backend"], "device": m["device"]["active"],
                "providers": m["providers"], "detector": m.get("detector"), "limits": m["limits"]}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


def _table(levels: list[dict], unit: str) -> list[str]:
    lines = [f"| server | clients | requests | {unit}/s | p50 ms | p99 ms | server CPU ms/request | non-200 |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in levels:
        bad = {k: v for k, v in r["statuses"].items() if str(k) != "200"} or "-"
        lines.append(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['units_per_s']} | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {r['cpu_ms']} | {bad} |")
    return lines


def _markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Serving speed ({report['tag'] or 'default'})", ""]
    for name, s in report["servers"].items():
        lines.append(f"- **{name}**: {s['repo']} at {s['commit']}; model {s['model']} ({s['contract_id']}), "
                     f"backend {s['backend']} on {s['device']} ({', '.join(s['providers'])}); detector "
                     f"{s['detector'] or 'mtcnn (not reported)'}")
    lines += ["", f"{m['cpu']}, {m['cores']} cores, load average at start {m['loadavg']}, at end {m['loadavg_end']}. "
              "Clients in the same machine over loopback. Verify: two 250x250 JPEGs per request (decode + "
              "detect + align + model + OOD for each).", "",
              "## POST /v1/verify", "", *_table(report["verify"], "requests")]
    if report["batch"]:
        lines += ["", f"## POST /v1/embed/batch ({report['batch_images']} images per request)", "",
                  *_table(report["batch"], "images")]
    if report.get("note"):
        lines += ["", report["note"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="exported model folder (default: a random-init vit_tiny_fiqa)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--clients", default="1,8,32", help="verify levels: concurrent clients")
    ap.add_argument("--requests", type=int, default=64, help="requests per level (at least 4 per client)")
    ap.add_argument("--batch-images", type=int, default=32, help="images per /v1/embed/batch request")
    ap.add_argument("--batch-clients", default="1,4", help="batch levels: concurrent clients ('' skips)")
    ap.add_argument("--batch-requests", type=int, default=8, help="batch requests per level")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--baseline-repo", help="also serve from this checkout and run each level on it first")
    ap.add_argument("--note", default="", help="a sentence for the report (conditions of the run)")
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
    loadavg = os.getloadavg()
    servers: list[Server] = []
    try:
        if args.baseline_repo:
            servers.append(Server(Path(args.baseline_repo).resolve(), model, args, Path(tmp.name), "baseline"))
        servers.append(Server(REPO, model, args, Path(tmp.name), "this" if args.baseline_repo else "server"))
        photos = _photos()
        verify, batch = [], []
        for c in (int(v) for v in args.clients.split(",") if v):
            for server in servers:
                verify.append(asyncio.run(_level(server, c, max(args.requests, 4 * c), _verify(photos), 1,
                                                 args.warmup)))
                print(json.dumps(verify[-1]), flush=True)
        for c in (int(v) for v in args.batch_clients.split(",") if v):
            for server in (s for s in servers if s.has_batch):
                batch.append(asyncio.run(_level(server, c, max(args.batch_requests, 2 * c),
                                                _batch(photos, args.batch_images), args.batch_images, 1)))
                print(json.dumps(batch[-1]), flush=True)
    finally:
        for server in servers:
            server.close()
    from facerec.sysinfo import cpu_name

    report = {
        "tag": args.tag,
        "servers": {s.name: s.describe() for s in servers},
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "loadavg": [round(v, 2) for v in loadavg],
                    "loadavg_end": [round(v, 2) for v in os.getloadavg()], "python": platform.python_version()},
        "verify": verify,
        "batch_images": args.batch_images,
        "batch": batch,
        "note": args.note,
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
