"""Large images and image bombs: what they cost the pipeline and a live service (issue 16, items 1-2).

Part 1, the pipeline (each case in a fresh process, so its peak RSS is its own): a 1 MP and a 36 MP
JPEG (a sample face upscaled), a 36 MP PNG (no reduced decoding), and the 36 MP JPEG with the
detector on the full image (``detect_max_side=None``: the behaviour before issue 16).

Part 2, a live service (``python -m service`` on a free 127.0.0.1 port, the shipped model, an API key
from the environment): the GIF and TIFF bombs through ``/v1/verify`` (time, status, the server's
peak RSS), then a verify's latency alone and while one batch enrollment of eight 36 MP JPEGs runs.

    python benchmarks/large_images.py            # writes benchmarks/results/large_images.json
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLES = ROOT / "tests" / "data" / "lfw_sample"
MODEL_DIR = ROOT / "models" / "default"
KEY = "bench-large-images-0123456789abcdef"

_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
from facerec.runtime import FacePipeline, load_backend
data = open({path!r}, "rb").read()
pipe = FacePipeline(load_backend({model!r}, device="cpu"), max_pixels=40_000_000,
                    detect_max_side={max_side})
pipe.process(open({warm!r}, "rb").read())  # sessions built, kernels chosen
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times, found = [], 0
for _ in range({runs}):
    t = time.perf_counter()
    result = pipe.process(data)
    times.append(time.perf_counter() - t)
    found = len(result.faces)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": times, "faces": found, "width": result.width, "height": result.height,
                  "peak_rss_mb": peak / 1024, "rss_growth_mb": (peak - before) / 1024}}))
"""


def face(name: str = "Adrien_Brody/Adrien_Brody_0001.jpg") -> np.ndarray:
    return cv2.imread(str(SAMPLES / name))


def encode(bgr: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, bgr, [cv2.IMWRITE_JPEG_QUALITY, 90] if ext == ".jpg" else [])
    assert ok
    return buf.tobytes()


def upscaled(side: int, ext: str, name: str = "Adrien_Brody/Adrien_Brody_0001.jpg") -> bytes:
    return encode(cv2.resize(face(name), (side, side), interpolation=cv2.INTER_CUBIC), ext)


def model_file() -> Path:
    return next(p for p in sorted(MODEL_DIR.glob("*.onnx")) if p.name.count(".") == 1)


def pipeline_cases(runs: int) -> dict:
    cases = {
        "1mp_jpeg": (1000, ".jpg", 1600, runs),
        "36mp_jpeg": (6000, ".jpg", 1600, runs),
        "36mp_png": (6000, ".png", 1600, runs),
        "36mp_jpeg_detector_on_full_image": (6000, ".jpg", None, 1),  # before issue 16
    }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm.jpg"
        warm.write_bytes((SAMPLES / "Adrien_Brody/Adrien_Brody_0001.jpg").read_bytes())
        for name, (side, ext, max_side, n) in cases.items():
            path = Path(tmp) / f"{name}{ext}"
            path.write_bytes(upscaled(side, ext))
            code = _CHILD.format(root=str(ROOT), path=str(path), model=str(model_file()), warm=str(warm),
                                 max_side=max_side, runs=n)
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                 check=True, timeout=900)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            r.update(bytes=path.stat().st_size, detect_max_side=max_side,
                     median_s=round(statistics.median(r["seconds"]), 3))
            out[name] = r
            print(f"{name}: {r['median_s']} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    return out


# ------------------------------------------------------------------------------- live service
def _rss_mb(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmHWM", "VmRSS")):
            key, value = line.split(":")
            fields[key] = int(value.split()[0]) / 1024
    return {"peak_rss_mb": round(fields.get("VmHWM", 0), 1), "rss_mb": round(fields.get("VmRSS", 0), 1)}


def live_service() -> dict:
    from service.testing import service_process
    from tests.test_image_bombs import gif_bomb, tiff_bomb

    tmp = tempfile.mkdtemp(prefix="facerec-bench-")
    env = {"FACEREC_API_KEYS": KEY, "FACEREC_DEVICE": "cpu", "FACEREC_MODEL": str(MODEL_DIR),
           "FACEREC_GALLERY_PATH": str(Path(tmp) / "g.sqlite3")}
    h = {"X-API-Key": KEY}
    out: dict = {}
    with service_process(env, Path(tmp) / "serve.log", ready_timeout_s=180, client_timeout_s=600) as (proc, client, _):
        a = (SAMPLES / "Adrien_Brody/Adrien_Brody_0001.jpg").read_bytes()
        b = (SAMPLES / "Adrien_Brody/Adrien_Brody_0002.jpg").read_bytes()

        def verify(image_b=b) -> tuple[float, int]:
            t = time.perf_counter()
            r = client.post("/v1/verify", files={"image_a": a, "image_b": image_b}, headers=h)
            return time.perf_counter() - t, r.status_code

        for _ in range(3):
            verify()
        out["rss_after_warmup"] = _rss_mb(proc.pid)
        out["bombs"] = {}
        for name, bomb in (("gif_20000x20000", gif_bomb()), ("tiff_20000x20000", tiff_bomb())):
            seconds, status = verify(bomb)
            out["bombs"][name] = {"bytes": len(bomb), "status": status, "seconds": round(seconds, 4)}
        out["rss_after_bombs"] = _rss_mb(proc.pid)

        alone = [verify() for _ in range(10)]
        out["verify_alone_s"] = {"median": round(statistics.median(t for t, _ in alone), 3),
                                 "max": round(max(t for t, _ in alone), 3)}
        gallery = client.post("/v1/galleries", json={"name": "bench"}, headers=h).json()["id"]
        people = sorted(p for p in SAMPLES.iterdir() if p.is_dir())[:8]
        persons = [{"name": p.name, "images": [base64.b64encode(upscaled(
            6000, ".jpg", str(next(iter(sorted(p.glob("*.jpg")))).relative_to(SAMPLES)))).decode()]}
            for p in people]
        body = json.dumps({"persons": persons})
        enrolled: dict = {}

        def enroll():
            t = time.perf_counter()
            r = client.post(f"/v1/galleries/{gallery}/enroll", content=body,
                            headers={**h, "Content-Type": "application/json"})
            enrolled.update(seconds=time.perf_counter() - t, status=r.status_code,
                            outcomes=[x["results"][0]["status"] for x in r.json().get("persons", [])]
                            if r.status_code == 200 else r.text[:300])

        thread = threading.Thread(target=enroll)
        thread.start()
        during = []
        while thread.is_alive():
            during.append(verify())
        thread.join()
        out["batch_enrollment_8x36mp"] = {
            "request_mb": round(len(body) / 2**20, 1), "seconds": round(enrolled["seconds"], 2),
            "status": enrolled["status"], "outcomes": enrolled["outcomes"]}
        out["verify_during_enrollment_s"] = {
            "count": len(during), "statuses": sorted({s for _, s in during}),
            "median": round(statistics.median(t for t, _ in during), 3) if during else None,
            "max": round(max(t for t, _ in during), 3) if during else None}
        out["rss_after_enrollment"] = _rss_mb(proc.pid)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "large_images.json"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--service-only", action="store_true", help="skip part 1 (the pipeline cases)")
    args = parser.parse_args()
    from service.settings import Settings

    settings = Settings(api_keys=[KEY])
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average_1min": round(os.getloadavg()[0], 2),
                    "python": platform.python_version(), "opencv": cv2.__version__},
        "service_settings": {k: getattr(settings, k) for k in (
            "max_pixels", "decode_workers", "large_image_pixels", "large_image_workers",
            "max_queued_large_images")},
    }
    if not args.service_only:
        result["pipeline"] = pipeline_cases(args.runs)
    result["service"] = live_service()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["service"], indent=2))


if __name__ == "__main__":
    main()
