"""A bounded schemathesis run, every check, against this checkout's service.

    python benchmarks/schemathesis_run.py                      # full: writes docs/schemathesis.md and
                                                               # benchmarks/results/schemathesis.json
    python benchmarks/schemathesis_run.py --max-examples 5 --max-time 60 --no-write   # quick look

Starts ``python -m service`` of this checkout on 127.0.0.1 (a free port) with a fast random-init
model (``service.testing.make_random_model``), an API key and a throw-away gallery database, waits
for readiness (polled, bounded), then runs the schemathesis CLI with ``--checks all`` and the key as
``X-API-Key`` on every request, bounded by ``--max-examples`` per operation and ``--max-time`` for
the whole run. Its JSON run report and the server's log are summarised: failures by check and by
operation, the number of 5xx answers, response-schema violations and tracebacks in the server log.

Exit status 0 only when there were no 5xx answers, no response-schema violations and no tracebacks
(``--strict``: no failure of any check). The CI variant is tests/test_schemathesis.py.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KEY = "schemathesis-key-0123456789abcdef"
# Checks whose failures the issue requires to be zero (the rest are reported).
HTTP_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}
REQUIRED_ZERO = ("not_a_server_error", "response_schema_conformance")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def schemathesis_cli() -> list[str]:
    exe = Path(sys.executable).with_name("schemathesis")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())"]


def wait_ready(base: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{base}/v1/health/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)  # polling interval, not synchronisation: readiness is checked each time
    raise TimeoutError(f"service not ready after {timeout_s} s")


def start_service(work: Path, model: Path, port: int) -> tuple[subprocess.Popen, Path]:
    log = work / "service.log"
    env = {**os.environ, "FACEREC_API_KEYS": KEY, "FACEREC_DEVICE": "cpu", "FACEREC_MODEL": str(model),
           "FACEREC_GALLERY_PATH": str(work / "galleries.sqlite3"), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, log


def run_schemathesis(base: str, work: Path, max_examples: int, max_time: int, seed: int,
                     workers: int, phases: str | None) -> tuple[int, Path, Path, str]:
    report = work / "report.json"
    ndjson = work / "events.ndjson"
    cmd = [*schemathesis_cli(), "run", f"{base}/openapi.json", "--checks", "all",
           "-H", f"X-API-Key: {KEY}", "--max-examples", str(max_examples), "--max-time", str(max_time),
           "--seed", str(seed), "--workers", str(workers), "--generation-database", "none",
           "--request-timeout", "30", "--no-color", "--continue-on-failure",
           "--report", "json,ndjson", "--report-json-path", str(report), "--report-ndjson-path", str(ndjson)]
    if phases:
        cmd += ["--phases", phases]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
    # cwd: schemathesis keeps a cache of failures in ./.schemathesis; keep it out of the checkout.
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max_time + 600, check=False,
                            cwd=work)
    return result.returncode, ndjson, report, result.stdout + result.stderr


def summarise(ndjson: Path, report: Path, cli_output: str, log_text: str) -> dict:
    """Failures by check and operation, status codes and 5xx answers, from schemathesis' NDJSON
    event stream (every case, check and response) and its JSON run report."""
    by_check: dict[str, set] = collections.defaultdict(set)
    examples: dict[str, dict] = {}
    statuses: collections.Counter = collections.Counter()
    server_errors: collections.Counter = collections.Counter()
    operations: set[str] = set()
    for line in ndjson.read_text().splitlines() if ndjson.exists() else []:
        event = json.loads(line).get("ScenarioFinished")
        if not event:
            continue
        rec = event.get("recorder") or {}
        label = rec.get("label", "?")
        interactions = rec.get("interactions") or {}
        for case_id, interaction in interactions.items():
            response = interaction.get("response") or {}
            code = response.get("status_code")
            if isinstance(code, int):
                if label.split(" ", 1)[0] in HTTP_METHODS:
                    operations.add(label)
                statuses[code] += 1
                if code >= 500:
                    server_errors[label] += 1
        for case_id, checks in (rec.get("checks") or {}).items():
            for check in checks:
                if check.get("status") != "failure":
                    continue
                by_check[check["name"]].add(label)
                key = f"{check['name']} | {label}"
                if key not in examples:
                    failure = (check.get("failure_info") or {}).get("failure") or {}
                    request = (interactions.get(case_id) or {}).get("request") or {}
                    examples[key] = {"title": failure.get("title"), "message": failure.get("message"),
                                     "request": _request_text(request),
                                     "status": ((interactions.get(case_id) or {}).get("response") or {})
                                     .get("status_code")}
    run = json.loads(report.read_text()) if report.exists() else {}
    failures = {check: sorted(ops) for check, ops in sorted(by_check.items())}
    return {
        "operations_tested": len(operations),
        "responses": sum(statuses.values()),
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "responses_5xx": sum(server_errors.values()),
        "responses_5xx_by_operation": dict(sorted(server_errors.items())),
        "failures_by_check": failures,
        "failure_examples": examples,
        "failure_types": [{k: f.get(k) for k in ("code", "title", "count", "operations")}
                          for f in run.get("failures", [])],
        "schemathesis_errors": run.get("errors", []),
        "test_cases": run.get("test_cases"),
        "stop_reason": run.get("stop_reason"),
        "schema_violations": len(failures.get("response_schema_conformance", [])),
        "server_tracebacks": log_text.count("Traceback"),
        "cli_summary": _cli_summary(cli_output),
    }


def _request_text(request: dict, limit: int = 300) -> str:
    import base64

    uri = re.sub(r"^https?://[^/]+", "", request.get("uri", ""))
    body = request.get("body") or {}
    raw = body.get("$base64") if isinstance(body, dict) else None
    text = base64.b64decode(raw).decode("utf-8", "replace") if raw else ""
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{request.get('method', '?')} {uri} {text}".strip()


def _cli_summary(output: str) -> str:
    lines = output.strip().splitlines()
    tail = [line for line in lines if re.search(r"passed|failed|errored|skipped|Seed|Test cases|API Operations|"
                                                r"Test Phases|Failures|Warnings", line)]
    return "\n".join(tail[-20:])


def write_markdown(path: Path, meta: dict, summary: dict) -> None:
    lines = [
        "# Schemathesis: the API against its own OpenAPI schema",
        "",
        f"`python benchmarks/schemathesis_run.py` ({meta['date']}, commit `{meta['commit']}`, "
        f"schemathesis {meta['schemathesis']}, {meta['platform']}): the service of this checkout with a "
        "random-init model on 127.0.0.1, every check (`--checks all`), authenticated with `X-API-Key`, "
        f"at most {meta['max_examples']} examples per operation and {meta['max_time']} s in all, seed "
        f"{meta['seed']}. JSON: `benchmarks/results/schemathesis.json`. The CI variant, "
        "`tests/test_schemathesis.py`, runs the same harness smaller.",
        "",
        "| what | count |",
        "|---|---|",
        f"| operations tested | {summary['operations_tested']} |",
        f"| responses | {summary['responses']} |",
        f"| 5xx answers | {summary['responses_5xx']} |",
        f"| operations with response-schema violations | {summary['schema_violations']} |",
        f"| tracebacks in the server log | {summary['server_tracebacks']} |",
        f"| run time | {meta['wall_s']:.0f} s |",
        "",
        "Status codes seen: " + ", ".join(f"{k}: {v}" for k, v in summary["status_counts"].items()) + ".",
        "",
        "## Failures by check",
        "",
    ]
    if not summary["failures_by_check"]:
        lines.append("None.")
    else:
        lines += ["| check | operations |", "|---|---|"]
        for check, ops in summary["failures_by_check"].items():
            lines.append(f"| `{check}` | {', '.join(f'`{o}`' for o in ops)} |")
    lines += [
        "",
        "## Verdict",
        "",
        meta["verdict"],
        "",
        "## How to read the other checks",
        "",
        "- `positive_data_acceptance` on the image operations (verify, quality, embed, detect, enroll, "
        "persons, samples, search) fails by construction: a schema-valid request carries arbitrary bytes "
        "where a photo goes, and the service rightly answers 422 (`invalid_image`, `no_face`). OpenAPI "
        "cannot say \"a decodable photo with a face\". On the other operations it means the schema "
        "accepts something the server refuses.",
        "- `negative_data_rejection`: the server accepted a request the schema forbids (the schema is "
        "stricter than the server); `status_code_conformance`: an answer with an undocumented status; "
        "`allow_header_conformance`: a 405 whose `Allow` header does not list the documented methods.",
        "- `Stateful tests`: schemathesis chains operations through links it infers from the schema. "
        "Two of its inferences do not hold here: it reads a 404 `person_not_found` after a gallery was "
        "created as \"the created gallery is missing\" (`ensure_resource_availability`), and it puts "
        "the `sample_id` of a refused photo (null) into a path as the text `None` (a 422 it counts as "
        "`positive_data_acceptance`).",
        "",
        "Rerun: `python benchmarks/schemathesis_run.py` (about six minutes on 2 CPUs); "
        "`--max-time`, `--max-examples`, `--seed`, `--phases` change the budget; `--artifacts DIR` keeps "
        "schemathesis' NDJSON events and JSON report and the service log.",
        "",
    ]
    path.write_text("\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-examples", type=int, default=50, help="per operation and phase")
    p.add_argument("--max-time", type=int, default=300, help="seconds for the whole schemathesis run")
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--phases", default=None, help="examples,coverage,fuzzing,stateful (default: all)")
    p.add_argument("--model", type=Path, default=None, help="model folder (default: a random-init one)")
    p.add_argument("--json", type=Path, default=HERE / "results" / "schemathesis.json")
    p.add_argument("--md", type=Path, default=REPO / "docs" / "schemathesis.md")
    p.add_argument("--no-write", action="store_true", help="print the summary only")
    p.add_argument("--strict", action="store_true", help="fail on a failure of any check")
    p.add_argument("--md-only", action="store_true", help="rewrite --md from --json, run nothing")
    p.add_argument("--artifacts", type=Path, default=None,
                   help="copy schemathesis' reports, its output and the service log here")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Start the service, run schemathesis, summarise; writes the JSON and Markdown unless
    ``--no-write``. Returns the summary (``ok`` is the verdict)."""
    sys.path.insert(0, str(REPO))
    import schemathesis

    from service.testing import make_random_model

    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="facerec-schemathesis-") as tmp:
        work = Path(tmp)
        model = args.model or make_random_model(work / "model", {"depth": 2})
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc, log = start_service(work, model, port)
        try:
            wait_ready(base, proc, timeout_s=120)
            rc, ndjson, report, output = run_schemathesis(base, work, args.max_examples, args.max_time, args.seed,
                                                  args.workers, args.phases)
            alive = proc.poll() is None
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(40)
        summary = summarise(ndjson, report, output, log.read_text(errors="replace"))
        (work / "cli.txt").write_text(output)
        summary["service_alive_after_run"] = alive
        if args.artifacts is not None:
            args.artifacts.mkdir(parents=True, exist_ok=True)
            for name in ("report.json", "events.ndjson", "cli.txt", "service.log"):
                if (work / name).exists():
                    shutil.copy(work / name, args.artifacts / name)
        summary["schemathesis_exit_code"] = rc
    wall = time.monotonic() - start
    required_ok = (summary["responses_5xx"] == 0 and summary["schema_violations"] == 0
                   and summary["server_tracebacks"] == 0 and alive and summary["responses"] > 0)
    ok = required_ok and (not args.strict or not summary["failures_by_check"])
    verdict = ("Zero 5xx, zero response-schema violations, no tracebacks." if required_ok else
               f"NOT CLEAN: {summary['responses_5xx']} 5xx answers, {summary['schema_violations']} operations "
               f"with response-schema violations, {summary['server_tracebacks']} tracebacks.")
    if summary["failures_by_check"]:
        verdict += " Other checks failed on the operations listed above."
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                 text=True, check=False).stdout.strip() or "unknown",
        "schemathesis": schemathesis.__version__ if hasattr(schemathesis, "__version__") else "?",
        "platform": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "max_examples": args.max_examples, "max_time": args.max_time, "seed": args.seed,
        "wall_s": wall, "verdict": verdict,
    }
    result = {**meta, **summary, "ok": ok}
    if not args.no_write:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        write_markdown(args.md, meta, summary)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.md_only:
        result = json.loads(args.json.read_text())
        write_markdown(args.md, result, result)
        return 0 if result["ok"] else 1
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "failure_examples"}, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
