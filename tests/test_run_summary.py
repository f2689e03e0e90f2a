"""benchmarks/run_summary.py: the numbers in its table are the runs' own log records."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)
ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("run_summary", ROOT / "benchmarks" / "run_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_summary_reads_validation_collapse_and_settings(tmp_path):
    rs = _module()
    run = tmp_path / "probe_a"
    run.mkdir()
    records = [
        {"kind": "train", "step": 100, "loss": 9.0, "collapsed_pairs": 0.01, "pair_cos": 0.1},
        {"kind": "message", "step": 200, "text": "step 200: warning: 9% of the different-identity pairs in this "
                                                 "batch have cosine > 0.9: the embedding is collapsing (...)"},
        {"kind": "val", "step": 200, "time": 1.0, "accuracy": 0.7183, "tar@far=0.01": 0.2433},
        {"kind": "train", "step": 200, "loss": 8.0, "collapsed_pairs": 0.254, "pair_cos": 0.3},
    ]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tr')  # cut short
    (run / "config.yaml").write_text("loss:\n  margin: arcface\noptim:\n  lr: 0.1\ntrain:\n  max_steps: 400\n")
    (run / "train.out").write_text("# 2026-11-28 07:00:00 python -m training --config X --run-dir R\nlog\n")
    out = tmp_path / "summary"
    assert rs.main([str(run), "--out", str(out)]) == 0
    saved = json.loads(out.with_suffix(".json").read_text())["runs"][0]
    assert saved["last_step"] == 200 and saved["collapsed_pairs_last"] == 0.254
    assert saved["collapse_warning_step"] == 200
    assert saved["command"] == "python -m training --config X --run-dir R"
    md = out.with_suffix(".md").read_text()
    assert "| probe_a | margin arcface, lr 0.1, max_steps 400 | 200 | 25.4% | step 200 | 200: 71.83% | 24.33% |" in md


def test_run_summary_refuses_a_folder_without_a_log(tmp_path):
    with pytest.raises(SystemExit, match="no log.jsonl"):
        _module().main([str(tmp_path), "--out", str(tmp_path / "x")])
