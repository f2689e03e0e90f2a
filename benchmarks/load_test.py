"""Load test: N concurrent clients send POST /v1/verify for a fixed time against one service.

    python benchmarks/load_test.py                        # starts facerec-serve (models/default, CPU)
    python benchmarks/load_test.py --clients 32 --duration 60 --warmup 15
    python benchmarks/load_test.py --url http://host:8000 --key $KEY [--pid PID]   # a running service

Each client is an asyncio task that sends a multipart verify of two real LFW sample photos, waits
for the answer and sends the next one (closed loop, no think time); a 429 is counted apart from
the errors and the client waits its Retry-After before going on, as a well-behaved client does.
Errors are every other non-2xx answer, every transport failure (timeout, reset) and every 200 whose
similarity differs from the one the same pair got when the service was idle (a micro-batcher that
mixed up rows under load would show up here, not as a status code).

The run has a warm-up phase (same load, not measured) and then the measured phase. The service's
resident memory (VmRSS of /proc/<pid>/status; the server is one process: model, batcher and
uvicorn live in it) is read after the warm-up, every second while measuring, and at the end; the
growth between the first and last reading is the leak check (it should stay under 5 %).

Writes benchmarks/results/load_test_<tag>.json and docs/load_test.md (``--md``); exits 1 when the
run had errors or the memory grew by 5 % or more. Clients and server share the machine: on a small
shared CPU the latencies are an upper bound.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SAMPLES = REPO / "tests" / "data" / "lfw_sample"
KEY = "load-test-key-0123456789abcdef"
GROWTH_LIMIT_PCT = 5.0
SIMILARITY_TOLERANCE = 1e-4  # batch composition may move the last float32 bits, never more


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB, from /proc/<pid>/status (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def mem_available_mib() -> float | None:
    """MemAvailable of the machine (Linux): under memory pressure the kernel evicts the server's
    file-backed pages and its RSS readings drop for reasons that are not the service's."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return None


def sample_pairs(n: int) -> list[tuple[str, str, bytes, bytes]]:
    """n verify pairs of sample photos: alternately the same person and two different people."""
    people = sorted(p for p in SAMPLES.iterdir() if p.is_dir())
    photos = {p.name: sorted(p.glob("*.jpg")) for p in people}
    pairs = []
    for i in range(n):
        a_person = people[i % len(people)].name
        a = photos[a_person][0]
        if i % 2 == 0:
            b = photos[a_person][1 + (i // len(people)) % (len(photos[a_person]) - 1)]
        else:
            other = people[(i * 7 + 3) % len(people)].name
            other = other if other != a_person else people[(i + 1) % len(people)].name
            b = photos[other][i % len(photos[other])]
        pairs.append((a.name, b.name, a.read_bytes(), b.read_bytes()))
    return pairs


@dataclass
class Tally:
    latencies_ms: list[float] = field(default_factory=list)  # 2xx answers
    statuses: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # kind -> count
    throttled: int = 0  # 429
    throttled_wait_s: float = 0.0
    max_similarity_diff: float = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def run_load(base: str, key: str, pairs, reference: list[float], clients: int, seconds: float,
                   timeout_s: float, tally: Tally | None, progress=None) -> None:
    """``clients`` closed-loop clients for ``seconds``; results go into ``tally`` (None: discard)."""
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=base, timeout=timeout_s, limits=limits) as http:
        async def client(index: int) -> None:
            i = index
            while time.monotonic() < deadline:
                name_a, name_b, a, b = pairs[i % len(pairs)]
                start = time.perf_counter()
                try:
                    r = await http.post("/v1/verify", headers={"X-API-Key": key},
                                        files={"image_a": (name_a, a, "image/jpeg"),
                                               "image_b": (name_b, b, "image/jpeg")})
                except httpx.HTTPError as exc:
                    if tally is not None:
                        tally.error(type(exc).__name__)
                    i += clients
                    continue
                elapsed_ms = (time.perf_counter() - start) * 1000.0
                if tally is not None:
                    tally.statuses[str(r.status_code)] = tally.statuses.get(str(r.status_code), 0) + 1
                if r.status_code == 429:
                    wait = float(r.headers.get("Retry-After", "1"))
                    if tally is not None:
                        tally.throttled += 1
                        tally.throttled_wait_s += wait
                    await asyncio.sleep(wait)  # what a well-behaved client does
                    continue  # the same pair again
                if tally is not None:
                    if 200 <= r.status_code < 300:
                        diff = abs(r.json()["similarity"] - reference[i % len(pairs)])
                        tally.max_similarity_diff = max(tally.max_similarity_diff, diff)
                        if diff > SIMILARITY_TOLERANCE:
                            tally.error("wrong_similarity")
                        else:
                            tally.latencies_ms.append(elapsed_ms)
                    else:
                        tally.error(f"http_{r.status_code}")
                if progress is not None:
                    progress.update(1)
                i += clients

        await asyncio.gather(*(client(c) for c in range(clients)))


async def references(base: str, key: str, pairs) -> list[float]:
    """Each pair's similarity with the service idle (one request at a time)."""
    import httpx

    out = []
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        for name_a, name_b, a, b in pairs:
            r = await http.post("/v1/verify", headers={"X-API-Key": key},
                                files={"image_a": (name_a, a, "image/jpeg"),
                                       "image_b": (name_b, b, "image/jpeg")})
            if r.status_code != 200:
                raise SystemExit(f"reference request failed: {r.status_code} {r.text}")
            out.append(r.json()["similarity"])
    return out


async def sample_memory(pid: int | None, every_s: float, out: list, stop: asyncio.Event) -> None:
    if pid is None:
        return
    start = time.monotonic()
    while not stop.is_set():
        out.append((round(time.monotonic() - start, 2), round(rss_mib(pid), 1), mem_available_mib()))
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except asyncio.TimeoutError:
            pass


async def measured_phase(args, base, key, pairs, reference, pid) -> tuple[Tally, list, float]:
    from tqdm import tqdm

    tally, trace, stop = Tally(), [], asyncio.Event()
    sampler = asyncio.create_task(sample_memory(pid, 1.0, trace, stop))
    start = time.perf_counter()
    with tqdm(desc=f"{args.clients} clients, {args.duration:g} s", unit="req", file=sys.stderr) as bar:
        await run_load(base, key, pairs, reference, args.clients, args.duration, args.timeout, tally, bar)
    wall = time.perf_counter() - start
    stop.set()
    await sampler
    return tally, trace, wall


def start_server(args, tmp: Path) -> tuple[subprocess.Popen, str, Path]:
    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "FACEREC_API_KEYS": KEY, "FACEREC_MODEL": args.model, "FACEREC_DEVICE": args.device,
           "PYTHONUNBUFFERED": "1"}
    log_path = tmp / "serve.log"
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        cmd = [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("server did not become ready:\n" + log_path.read_text())
        try:
            if httpx.get(f"{base}/v1/health/ready", timeout=5).status_code == 200:
                return proc, base, log_path
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def percentile(values, q) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


def summarise(args, tally: Tally, wall: float, rss_warm: float | None, rss_end: float | None, trace,
              models: dict, loadavg, server_log_errors: int) -> dict:
    ok = len(tally.latencies_ms)
    errors = sum(tally.errors.values())
    growth = None if rss_warm is None else round((rss_end - rss_warm) / rss_warm * 100.0, 2)
    return {
        "tag": args.tag,
        "command": " ".join(["python benchmarks/load_test.py", *sys.argv[1:]]),
        "target": "url" if args.url else "subprocess",
        "clients": args.clients, "warmup_s": args.warmup, "duration_s": args.duration,
        "wall_s": round(wall, 2),
        "requests": ok + errors + tally.throttled, "ok": ok, "errors": errors, "error_kinds": tally.errors,
        "throttled_429": tally.throttled, "throttled_wait_s": round(tally.throttled_wait_s, 1),
        "statuses": tally.statuses,
        "throughput_rps": round(ok / wall, 2),
        "latency_ms": {"p50": percentile(tally.latencies_ms, 50), "p95": percentile(tally.latencies_ms, 95),
                       "p99": percentile(tally.latencies_ms, 99),
                       "max": round(max(tally.latencies_ms), 1) if ok else None,
                       "mean": round(float(np.mean(tally.latencies_ms)), 1) if ok else None},
        "max_similarity_diff": tally.max_similarity_diff,
        "memory": {"rss_after_warmup_mib": rss_warm, "rss_end_mib": rss_end, "growth_pct": growth,
                   "rss_max_mib": max((v for _, v, _ in trace), default=None), "limit_pct": GROWTH_LIMIT_PCT,
                   "trace_every_s": 1.0, "trace_mib": [v for _, v, _ in trace],
                   "system_available_min_mib": min((a for _, _, a in trace if a is not None), default=None)},
        "server_log_tracebacks": server_log_errors,
        "server": {"model": f"{models['contract']['model_name']} {models['contract']['model_version']}",
                   "contract_id": models["contract_id"], "backend": models["model"]["backend"],
                   "device": models["device"]["active"], "providers": models["providers"],
                   "limits": models["limits"]},
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(),
                    "loadavg_at_start": [round(v, 2) for v in loadavg],
                    "python": platform.python_version()},
        "passed": errors == 0 and (growth is None or growth < GROWTH_LIMIT_PCT) and ok > 0,
    }


def _cpu_name() -> str:
    sys.path.insert(0, str(REPO))
    from facerec.sysinfo import cpu_name

    return cpu_name()


def memory_trend(trace: list[float]) -> tuple[float, float] | None:
    """(span in MiB, fitted slope in MiB/min) of the last half of a 1-reading-a-second RSS trace."""
    half = trace[len(trace) // 2 :]
    if len(half) < 2:
        return None
    slope = float(np.polyfit(np.arange(len(half)), half, 1)[0]) * 60.0
    return round(max(half) - min(half), 1), round(slope, 2)


def other_runs(paths: list[str]) -> str:
    """A table of earlier runs (their JSON files), e.g. a longer leak check."""
    if not paths:
        return ""
    lines = ["", "Other runs of this script (same machine, same kind of shared load):", "",
             ("| run | clients x s | 200 OK | errors | 429 | req/s | p50 / p99 ms | RSS after warm-up -> end "
              "(max) MiB | growth | last-half span, trend |"),
             "|---|---:|---:|---:|---:|---:|---|---|---:|---|"]
    for path in paths:
        r = json.loads(Path(path).read_text())
        mem, lat = r["memory"], r["latency_ms"]
        trend = memory_trend(mem["trace_mib"])
        trend_text = "n/a" if trend is None else f"{trend[0]} MiB, {trend[1]:+.2f} MiB/min"
        lines.append(f"| `{Path(path).name}` | {r['clients']} x {r['duration_s']:g} | {r['ok']} | "
                     f"{r['errors']} | "
                     f"{r['throttled_429']} | {r['throughput_rps']} | {lat['p50']} / {lat['p99']} | "
                     f"{mem['rss_after_warmup_mib']} -> {mem['rss_end_mib']} ({mem['rss_max_mib']}) | "
                     f"{mem['growth_pct']:+.2f} % | {trend_text} |")
    return "\n".join(lines) + "\n"


def markdown(r: dict, also: list[str] | None = None) -> str:
    s, m, lat, mem = r["server"], r["machine"], r["latency_ms"], r["memory"]
    growth = "n/a (no --pid)" if mem["growth_pct"] is None else f"{mem['growth_pct']:+.2f} %"
    kinds = ", ".join(f"{k}: {v}" for k, v in r["error_kinds"].items()) or "none"
    verdict = "passed" if r["passed"] else "FAILED"
    lim, c, end_load = s["limits"], r["clients"], m.get("loadavg_at_end", [])
    if 2 * c <= lim.get("max_pending_faces", 0) and c <= lim.get("max_concurrent_requests", 0):
        queue = (f"At these limits {c} clients cannot fill the queue ({c} requests x 2 faces = {2 * c} "
                 f"faces <= {lim['max_pending_faces']} pending, {c} <= {lim['max_concurrent_requests']} "
                 "concurrent requests), so no 429 is expected.")
    else:
        queue = f"{c} clients can exceed the queue limits, so 429s are expected (counted above)."
    trace, trend = mem["trace_mib"], memory_trend(mem["trace_mib"])
    if trend is None:
        plateau = "too few readings for a trend (no --pid, or a short run)."
    else:
        plateau = (f"{len(trace)} readings, {min(trace)} to {max(trace)} MiB; over the last half of the "
                   f"measured phase they span {trend[0]} MiB with a fitted trend of {trend[1]:+.2f} MiB/min. "
                   "The first and last readings (the growth) are taken with the service idle, after the "
                   "in-flight requests have drained; the trace is under load.")
    return f"""# Load test: {r['clients']} concurrent clients on POST /v1/verify

A benchmark, not part of CI: {r['clients']} closed-loop clients (asyncio + httpx, one connection
each) send multipart verify requests with two real LFW sample photos each (250x250 JPEG: decode,
MTCNN detection, alignment, micro-batched model, OOD score, for both) to one `facerec-serve`
process on loopback for {r['duration_s']:g} s, after a {r['warmup_s']:g} s warm-up under the same load.
A 429 is counted apart from the errors and its client waits the `Retry-After` before retrying.
Errors are any other non-2xx answer, any transport failure, and any 200 whose similarity differs
by more than {SIMILARITY_TOLERANCE:g} from what the same pair scored on the idle service (a batcher
that mixed up rows under load would be caught there). Memory is the server process's VmRSS
(`/proc/<pid>/status`) after the warm-up, every second while measuring, and at the end.

```bash
{r['command']}
```

Service: {s['model']} (contract `{s['contract_id']}`), {s['backend']} on {s['device']}
({', '.join(s['providers'])}), one uvicorn process, default limits (max batch
{lim.get('max_batch_size')}, max pending faces {lim.get('max_pending_faces')}, max concurrent
requests {lim.get('max_concurrent_requests')}).
Machine: {m['cpu']}, {m['cores']} cores, **shared**: the clients, the server and other jobs
(evaluations, test suites) used the same cores; load average at the start
{', '.join(str(v) for v in m['loadavg_at_start'])}, at the end {', '.join(str(v) for v in end_load)}.
The latencies are therefore an upper bound for this CPU, and the throughput a floor. Memory
available to the machine: {m.get('mem_available_at_start_mib')} MiB at the start, at least
{mem.get('system_available_min_mib')} MiB while measuring (when it runs low the kernel evicts the server's
file-backed pages and its RSS falls for reasons that are not the service's).

| | |
|---|---|
| result | **{verdict}** (zero errors, memory growth under {mem['limit_pct']:g} %) |
| requests answered (measured phase) | {r['requests']} in {r['wall_s']} s |
| 200 OK | {r['ok']} ({r['throughput_rps']} requests/s) |
| errors | {r['errors']} ({kinds}) |
| 429 (counted apart) | {r['throttled_429']} |
| latency p50 / p95 / p99 / max | {lat['p50']} / {lat['p95']} / {lat['p99']} / {lat['max']} ms |
| largest similarity difference vs idle | {r['max_similarity_diff']:.2e} |
| server RSS after warm-up | {mem['rss_after_warmup_mib']} MiB |
| server RSS at the end | {mem['rss_end_mib']} MiB (max while measuring {mem['rss_max_mib']} MiB) |
| growth | {growth} |
| tracebacks in the server log | {r['server_log_tracebacks']} |

Raw numbers, with the RSS trace (one reading a second): `benchmarks/results/load_test_{r['tag']}.json`.
{queue} The latency is the queueing of {r['clients']} requests behind a CPU that answers about
{r['throughput_rps']} per second (p50 ~ clients / throughput). Memory: {plateau}
""" + other_runs(also or [])


async def main_async(args) -> int:
    import httpx

    loadavg, avail_start = os.getloadavg(), mem_available_mib()
    tmp = tempfile.TemporaryDirectory()
    proc, log_path = None, None
    if args.url:
        base, key, pid = args.url.rstrip("/"), args.key, args.pid
        if not key:
            raise SystemExit("--url needs --key (the service's API key)")
    else:
        proc, base, log_path = start_server(args, Path(tmp.name))
        key, pid = KEY, proc.pid
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            r = await http.get("/v1/models", headers={"X-API-Key": key})
            if r.status_code != 200:
                raise SystemExit(f"/v1/models answered {r.status_code}: {r.text}")
            models = r.json()
        pairs = sample_pairs(args.pairs)
        reference = await references(base, key, pairs)
        print(f"warm-up: {args.clients} clients for {args.warmup:g} s", file=sys.stderr, flush=True)
        await run_load(base, key, pairs, reference, args.clients, args.warmup, args.timeout, None)
        rss_warm = round(rss_mib(pid), 1) if pid else None
        tally, trace, wall = await measured_phase(args, base, key, pairs, reference, pid)
        rss_end = round(rss_mib(pid), 1) if pid else None
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    tracebacks = log_path.read_text().count("Traceback") if log_path is not None else 0
    report = summarise(args, tally, wall, rss_warm, rss_end, trace, models, loadavg, tracebacks)
    report["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    report["machine"]["mem_available_at_start_mib"] = avail_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"load_test_{args.tag}.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(markdown(report, args.also))
    summary = {k: report[k] for k in ("requests", "ok", "errors", "throttled_429", "throughput_rps",
                                       "latency_ms", "passed")}
    summary["memory"] = {k: v for k, v in report["memory"].items() if k != "trace_mib"}
    print(json.dumps(summary, indent=1))
    return 0 if report["passed"] else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running service (default: start one on a free port)")
    ap.add_argument("--key", help="its API key (with --url)")
    ap.add_argument("--pid", type=int,
                    help="its process id, for the memory readings (with --url, same machine)")
    ap.add_argument("--model", default=os.environ.get("FACEREC_MODEL") or str(REPO / "models" / "default"),
                    help="model folder for the started service (default FACEREC_MODEL, else models/default)")
    ap.add_argument("--device", default="cpu", help="FACEREC_DEVICE of the started service")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients")
    ap.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds of the same load before measuring")
    ap.add_argument("--pairs", type=int, default=64, help="distinct photo pairs cycled through")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    ap.add_argument("--tag", default="cpu", help="results file: benchmarks/results/load_test_<tag>.json")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder of the JSON results")
    ap.add_argument("--md", default=str(REPO / "docs" / "load_test.md"),
                    help="Markdown report to write ('' for none)")
    ap.add_argument("--also", nargs="*", default=[], metavar="JSON",
                    help="earlier results of this script to list in the Markdown (e.g. a longer run)")
    args = ap.parse_args()
    if args.clients < 1 or args.duration <= 0 or args.warmup < 0:
        ap.error("--clients must be >= 1, --duration > 0 and --warmup >= 0")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
