"""The README's main job, as written: `facerec-train --config tiny_cpu --run-dir DIR` trains a small
MobileFaceNet on the bundled LFW sample and prints a verification result on held-out people."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_readme_quick_start_trains_and_prints_a_verification_result(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert "facerec-train --config tiny_cpu --run-dir runs/quickstart" in readme  # the command tested here
    run_dir = tmp_path / "quickstart"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "training", "--config", "tiny_cpu", "--run-dir", str(run_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    printed = re.findall(r"step (\d+): validation ([\d.]+)% ± [\d.]+ \((\d+) folds\)", output)
    assert printed, output[-3000:]
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"]
    assert [int(step) for step, _, _ in printed] == [r["step"] for r in val]
    last = val[-1]
    assert float(printed[-1][1]) == pytest.approx(100 * last["accuracy"], abs=0.005)
    # it learns its 24 training people (the loss falls by orders of magnitude) ...
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < 0.05 * losses[0], losses
    # ... and the held-out people (24-31, balanced pairs, chance 50%) are told apart better than chance;
    # 32 people are too few for more (about 60-68% in our runs: a smoke test, not a benchmark)
    assert max(r["accuracy"] for r in val) > 0.55, val
    assert (run_dir / "config.yaml").exists() and (run_dir / "checkpoints" / "best.json").exists()
