"""The method-comparison campaign (benchmarks/method_comparison.py): which rows, which settings, resume,
aggregation over seeds; and the low-resolution MobileFaceNet its CPU protocol trains."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

from training.__main__ import config_path
from training.config import load_config

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mc():
    spec = importlib.util.spec_from_file_location("method_comparison", ROOT / "benchmarks" / "method_comparison.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["method_comparison"] = module
    spec.loader.exec_module(module)
    return module


def test_rows_cover_every_margin_with_and_without_unpg(mc):
    rows = mc.plan_rows("cpu")
    seed0 = {(r.margin, r.unpg) for r in rows if r.seed == 0}
    assert seed0 == {(m, u) for m in mc.MARGINS for u in (False, True)}
    assert len(mc.MARGINS) == 6
    # headline rows have three seeds, the others one; all seed-0 rows come first
    per_key = {}
    for r in rows:
        per_key.setdefault(r.key, []).append(r.seed)
    assert all(per_key[k] == [0, 1, 2] for k in mc.HEADLINE)
    assert all(v == [0] for k, v in per_key.items() if k not in mc.HEADLINE)
    assert [r.seed for r in rows[:12]] == [0] * 12
    assert len(mc.plan_rows("cpu", seeds=3)) == 36
    assert [r.name for r in mc.plan_rows("gpu-r18")] == ["arcface-s0", "elastic_arcface_plus+unpg-s0"]
    with pytest.raises(SystemExit, match="unknown rows"):
        mc.plan_rows("cpu", only=["sphereface"])


@pytest.mark.parametrize("protocol", ["cpu", "gpu", "gpu-r18"])
def test_each_row_resolves_to_a_valid_training_config(mc, protocol, tmp_path):
    for row in mc.plan_rows(protocol)[:4]:
        cmd = mc.train_command(protocol, row, tmp_path / row.name, "/pool", "/lfw", None)
        overrides = [cmd[i + 1] for i, c in enumerate(cmd) if c == "--set"]
        cfg = load_config(config_path("pool_mobilefacenet"), overrides)
        assert cfg.loss.margin == row.margin and cfg.loss.unpg == row.unpg and cfg.train.seed == row.seed
        assert cfg.loss.margin_kwargs == {}  # the official defaults of each margin, not the base file's
        assert cfg.val.kind == "lfw_fold" and cfg.val.path == "/lfw"  # selection on validation only
        assert cfg.data.path == "/pool" and cfg.model.name == mc.PROTOCOLS[protocol]["model.name"]
        assert cfg.train.epochs == mc.PROTOCOLS[protocol]["train.epochs"]  # same budget for every row
        assert "--resume" not in cmd
    cfg = load_config(config_path("pool_mobilefacenet"),
                      [o for o in mc.overrides(protocol, row, "/pool", "/lfw", "/v.bin")])
    assert cfg.val.kind == "bin" and cfg.val.path == "/v.bin"


def test_started_rows_resume_and_done_rows_are_skipped(mc, tmp_path):
    row = mc.plan_rows("cpu")[0]
    run = tmp_path / row.name
    ckpt = run / "checkpoints" / "step_00000100"
    ckpt.mkdir(parents=True)
    assert "--resume" not in mc.train_command("cpu", row, run, "/p", "/l", None)  # no complete checkpoint
    (ckpt / "meta.json").write_text("{}")
    cmd = mc.train_command("cpu", row, run, "/p", "/l", None)
    assert cmd[cmd.index("--resume") + 1] == "auto"
    assert not mc.is_done(run)
    (run / "done.json").write_text("{}")
    assert mc.is_done(run)
    (run / "checkpoints" / "best.json").write_text('{"dir": "step_00000100"}')
    assert mc.best_checkpoint(run) == ckpt


def test_aggregate_mean_and_sample_std_over_seeds(mc):
    results = {
        "arcface-s0": {"val_accuracy": 0.80, "h2_accuracy": 0.70, "h2_tar_1e-2": 0.3, "val_tar_1e-2": 0.2},
        "arcface-s1": {"val_accuracy": 0.84, "h2_accuracy": 0.74, "h2_tar_1e-2": 0.5, "val_tar_1e-2": None},
        "cosface+unpg-s0": {"val_accuracy": 0.9, "h2_accuracy": 0.8, "h2_tar_1e-2": 0.6, "val_tar_1e-2": 0.4},
        "arcface+unpg-s0": {"val_accuracy": 0.5, "h2_accuracy": 0.5, "h2_tar_1e-2": None, "val_tar_1e-2": None},
    }
    table = mc.aggregate(results)
    assert [e["row"] for e in table] == ["arcface", "arcface+unpg", "cosface+unpg"]  # table order
    arc = table[0]
    assert arc["seeds"] == 2
    assert arc["val_accuracy"] == pytest.approx(0.82)
    assert arc["val_accuracy_std"] == pytest.approx(statistics.stdev([0.80, 0.84]))
    assert arc["val_tar_1e-2"] == pytest.approx(0.2) and arc["val_tar_1e-2_std"] is None  # one value
    assert table[1]["h2_tar_1e-2"] is None  # unsupported TAR stays missing, never zero
    assert table[2]["h2_accuracy_std"] is None


def test_tar_lookup_respects_support(mc):
    report = {"tar_at_far": [{"far": 0.01, "tar": 0.4, "supported": True},
                             {"far": 0.0001, "tar": 0.1, "supported": False}]}
    assert mc._tar(report, 1e-2) == 0.4
    assert mc._tar(report, 1e-4) is None


def test_low_resolution_mobilefacenet():
    from facerec.models import create_model

    torch.manual_seed(0)
    full = create_model("mobilefacenet", width=0.5, embedding_size=128)
    low = create_model("mobilefacenet", width=0.5, embedding_size=128, downsample=2)
    assert full.gdc[0].kernel_size == (7, 7) and low.gdc[0].kernel_size == (4, 4)  # 56 -> 28 -> 14 -> 7 -> 4
    x = torch.randn(2, 3, 112, 112)
    low.eval()
    out = low(x, return_features=True)
    assert out.embedding.shape == (2, 128) and len(out.features) == len(low.feature_dims)
    # the same network on the 2x2-averaged image: copy the weights into a 56x56-input twin
    twin = create_model("mobilefacenet", width=0.5, embedding_size=128, downsample=1)
    twin.gdc = low.gdc
    twin.load_state_dict(low.state_dict())
    twin.eval()
    ref = twin(torch.nn.functional.avg_pool2d(x, 2)).embedding
    torch.testing.assert_close(out.embedding, ref)
    with pytest.raises(ValueError, match="downsample"):
        create_model("mobilefacenet", downsample=3)


def test_embedding_spread_tells_spread_from_collapsed_embeddings():
    from facerec.eval import spread as es

    spread = es.spread(3.0 * torch.eye(8))  # eight orthogonal directions, norm 3
    assert spread["mean_pairwise_cosine"] == pytest.approx(0.0, abs=1e-12)
    assert spread["mean_direction_length"] == pytest.approx(8**-0.5)  # |sum of 8 unit axes| / 8
    assert spread["mean_embedding_norm"] == pytest.approx(3.0)
    assert spread["dims_for_90pct_variance"] == 7  # centred: 7 equal directions, 90% needs all 7
    g = torch.Generator().manual_seed(0)
    cone = torch.tensor([1.0, 0, 0, 0]) + 0.01 * torch.randn(50, 4, generator=g)  # all nearly one direction
    collapsed = es.spread(cone)
    assert collapsed["mean_pairwise_cosine"] > 0.99 and collapsed["mean_direction_length"] > 0.99


@pytest.mark.parametrize("margin,m", [("arcface", 0.5), ("cosface", 0.35)])
def test_collapse_basin_loss_equals_the_margin_softmax_on_a_collapsed_configuration(margin, m):
    """K classes and their samples on one direction, the other classes orthogonal to it: the
    formula of benchmarks/collapse_check.py must equal cross-entropy over the real margin head."""
    spec = importlib.util.spec_from_file_location("collapse_check", ROOT / "benchmarks" / "collapse_check.py")
    cc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cc)
    from facerec.heads import create_margin

    k, others, s = 70, 30, 64.0
    cosine = torch.zeros(k, k + others, dtype=torch.float64)
    cosine[:, :k] = 1.0  # every sample sits on every collapsed centre
    labels = torch.arange(k)
    logits = create_margin(margin, s=s, m=m)(cosine, labels)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    # the orthogonal classes add (others) * exp(0) to the denominator, which the formula ignores
    formula = cc.collapse_basin_loss(margin, s, m, k)
    # ArcFace clamps the cosine to 1 - 1e-6 before arccos (margins.COS_EPS), so theta >= 1.4e-3 rad
    # and the head's target is lower than cos(m) by about s * sin(m) * 1.4e-3 = 0.043 nats
    slack = 0.05 if margin == "arcface" else 1e-9
    assert float(ce) == pytest.approx(formula, abs=slack)
    assert cc.collapse_basin_loss("arcface", 64, 0.5, 70) < cc.collapse_basin_loss("cosface", 64, 0.35, 70) - 14


def finished_row(runs: Path, validation: dict, row: str = "cosface-s0") -> Path:
    """A finished ``cpu`` row under ``runs``: best checkpoint step 100 and an evaluation file whose
    validation part is ``validation`` (LFW-H2 86.00 ± 1.00; TAR 50% at FAR 1e-2). Returns that file."""
    run = runs / "cpu" / row
    (run / "checkpoints" / "step_00000100").mkdir(parents=True)
    (run / "checkpoints" / "best.json").write_text('{"dir": "step_00000100"}')
    (run / "done.json").write_text("{}")
    (run / "eval").mkdir()
    tars = [{"far": 0.01, "tar": 0.5, "supported": True}]
    file = run / "eval" / f"eval_lfw_{row}.json"
    file.write_text(json.dumps({"validation": {**validation, "tar_at_far": tars},
                                "lfw_h2": {"accuracy_mean": 0.86, "accuracy_std": 0.01, "tar_at_far": tars}}))
    return file


def test_tagged_report_keeps_an_ablation_apart_and_names_its_overrides(mc, tmp_path):
    """report reads finished rows' evaluation files; --tag/--set write a separate, labelled table."""
    file = finished_row(tmp_path / "runs", {"folds": "stratified", "accuracy_mean": 0.83, "accuracy_std": 0.04})
    run = file.parents[1]
    (run / "config.yaml").write_text("data:\n  min_images_per_identity: 2\n  path: /data/pool112\n"
                                     "val:\n  path: /data/lfw112\n")
    out = tmp_path / "results"
    common = ["report", "--protocol", "cpu", "--runs", str(tmp_path / "runs"), "--rows", "cosface",
              "--lfw", "/unused", "--results", str(out)]
    with pytest.raises(SystemExit, match="give --tag too"):
        mc.main([*common, "--set", "data.min_images_per_identity=2"])
    with pytest.raises(SystemExit, match="trained with data.min_images_per_identity=2, not 3"):
        mc.main([*common, "--tag", "min3", "--set", "data.min_images_per_identity=3"])
    assert mc.main(["report", "--protocol", "cpu", "--runs", str(tmp_path / "runs"), "--rows", "cosface",
                    "--lfw", "/unused", "--results", str(out), "--tag", "min2",
                    "--set", "data.min_images_per_identity=2"]) == 0
    md = (out / "method_comparison_cpu_min2.md").read_text()
    assert "| CosFace | 1 | 83.00 | 50.00 | 86.00 | 50.00 |" in md
    assert "--set data.min_images_per_identity=2" in md
    saved = json.loads((out / "method_comparison_cpu_min2.json").read_text())
    assert saved["extra"] == ["data.min_images_per_identity=2"]
    command = saved["runs"]["cosface-s0"]["command"]
    assert command.endswith("--set data.min_images_per_identity=2")
    # runnable as written: the pool and LFW tree the run was trained on, and its runs folder
    assert f"--pool /data/pool112 --lfw /data/lfw112 --runs {tmp_path / 'runs'} --rows cosface" in command
    assert f"`{command}`" in md
    # the per-run table carries the fold std and TAR at 1e-3 (unsupported here: "–")
    assert "| cosface-s0 | step_00000100 | 83.00 ± 4.00 | 50.00 / – | 86.00 ± 1.00 | 50.00 / – |" in md
    assert not (out / "method_comparison_cpu.md").exists()


def test_report_recomputes_an_evaluation_made_with_unstratified_folds(mc, tmp_path, monkeypatch):
    file = finished_row(tmp_path / "runs", {"accuracy_mean": 0.80, "accuracy_std": 0.1})  # no "folds" key
    run = file.parents[1]
    old = json.loads(file.read_text())
    calls = []

    def fake_run(cmd, **kwargs):  # stands in for benchmarks/evaluate_lfw.py
        calls.append(cmd)
        new = json.loads(json.dumps(old))
        new["validation"].update(folds="stratified", accuracy_mean=0.82)
        file.write_text(json.dumps(new))

    monkeypatch.setattr(mc.subprocess, "run", fake_run)
    args = ["report", "--protocol", "cpu", "--runs", str(tmp_path / "runs"), "--rows", "cosface",
            "--lfw", "/lfw", "--results", str(tmp_path / "results")]
    assert mc.main(args) == 0
    assert len(calls) == 1 and "evaluate_lfw.py" in calls[0][1] and str(run / "checkpoints" / "step_00000100") in calls[0]
    assert "| CosFace | 1 | 82.00 |" in (tmp_path / "results" / "method_comparison_cpu.md").read_text()
    assert mc.main(args) == 0 and len(calls) == 1  # up to date now: not evaluated again
