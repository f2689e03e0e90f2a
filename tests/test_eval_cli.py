"""``facerec eval verify|quality|ood`` end to end on 12 people x 5 images of the bundled LFW sample.

The sample's originals are detected once (``facerec.eval.face_meta``), aligned with those
landmarks, and the shipped model (models/default, or $FACEREC_MODEL) embeds the crops. The
reports' numbers are re-derived here from the embedding cache the command wrote.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from facerec.cli import main

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]
MODEL = Path(os.environ.get("FACEREC_MODEL") or REPO / "models" / "default")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    if not any(MODEL.glob("*.onnx")):
        pytest.skip(f"no exported model at {MODEL}")
    from facerec.data.verification import save_bin
    from sample_helpers import align_sample, sample_people, write_sample_pairs

    tmp = tmp_path_factory.mktemp("eval_cli")
    people = sample_people()[:12]
    from facerec.bundle import ModelBundle

    contract = ModelBundle(MODEL).contract()  # the shipped model's own crops (2.1: the 192 px canvas)
    aligned, _ = align_sample(tmp, people, contract.alignment, contract.input_size)
    pairs = write_sample_pairs(tmp / "pairs.txt", people)
    blobs = []
    for p in pairs:
        for name, idx in ((p.name1, p.index1), (p.name2, p.index2)):
            blobs.append((aligned / name / f"{name}_{idx:04d}.jpg").read_bytes())
    save_bin(tmp / "sample.bin", blobs, [p.same for p in pairs])
    return tmp


def _normalised(cache: Path, flip: bool) -> np.ndarray:
    z = np.load(cache)
    e = z["embedding"] / np.linalg.norm(z["embedding"], axis=1, keepdims=True)
    if flip:
        f = z["embedding_flip"] / np.linalg.norm(z["embedding_flip"], axis=1, keepdims=True)
        e = (e + f) / np.linalg.norm(e + f, axis=1, keepdims=True)
    return e


def test_verify_pairs_all_pairs_and_pose(sample, capsys):
    out = sample / "verify"
    rc = main(["eval", "verify", str(MODEL), "--images", str(sample / "aligned"), "--pairs",
               str(sample / "pairs.txt"), "--meta", str(sample / "meta.npz"), "--flip", "--cache",
               str(sample / "emb.npz"), "--fars", "1e-2,1e-3,1e-5", "--out", str(out), "--no-progress"])
    assert rc == 0
    for f in ("metrics.json", "roc.json", "roc.png", "pose.png", "summary.md"):
        assert (out / f).exists(), f
    m = json.loads((out / "metrics.json").read_text())
    pl, ap = m["pair_list"], m["all_pairs"]
    assert pl["pairs"] == 24 and pl["folds"] == 2 and 0.5 <= pl["accuracy_mean"] <= 1.0
    assert ap["genuine"] == 12 * 10 and ap["impostors"] == 60 * 59 // 2 - 120
    tars = {t["far"]: t for t in ap["tar_at_far"]}
    assert tars[1e-2]["supported"] and not tars[1e-5]["supported"] and tars[1e-5]["tar"] is None
    # the pair list's 12 impostors cannot measure FAR 1e-2: flagged, not a number
    assert not {t["far"]: t for t in pl["tar_at_far"]}[1e-2]["supported"]
    # re-derive the all-pairs numbers from the embeddings the command cached
    e = _normalised(sample / "emb.npz", flip=True)
    names = np.repeat(np.arange(12), 5)
    sims = e @ e.T
    iu = np.triu_indices(60, 1)
    same = names[iu[0]] == names[iu[1]]
    genuine, impostor = sims[iu][same], sims[iu][~same]
    thr = np.sort(impostor)[::-1][int(np.floor(1e-2 * impostor.size))]
    assert tars[1e-2]["tar"] == pytest.approx(np.mean(genuine > thr), abs=1e-6)
    cuts = np.sort(np.r_[genuine, impostor])
    far = 1 - np.searchsorted(np.sort(impostor), cuts, side="left") / impostor.size  # P(imp >= t)
    frr = np.searchsorted(np.sort(genuine), cuts, side="left") / genuine.size  # P(gen < t)
    i = np.argmin(np.abs(far - frr))
    assert ap["eer"]["eer"] == pytest.approx((far[i] + frr[i]) / 2, abs=0.01)
    # pose: every image in a bin, pair counts of the bins add up
    per_bin = m["yaw_bins"]["images_per_bin"]
    assert sum(per_bin.values()) == 60
    assert sum(r.get("pairs", 0) for r in m["pose_table"]) == 24
    assert sum(b["genuine"] for b in ap["by_pose"].values()) == 120
    assert "By head pose" in (out / "summary.md").read_text()


def test_verify_bin_with_detected_pose(sample):
    out = sample / "verify_bin"
    rc = main(["eval", "verify", str(MODEL), "--bin", str(sample / "sample.bin"), "--folds", "2",
               "--detect-pose", "--out", str(out), "--no-progress"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["pair_list"]["pairs"] == 24 and "all_pairs" not in m
    assert m["faces_found"] >= 44  # MTCNN finds the face in (almost) every one of the 48 crops
    assert (out / "roc.png").exists()


def test_quality_with_head_detector_score_and_identity_bootstrap(sample):
    out = sample / "quality"
    rc = main(["eval", "quality", str(MODEL), "--images", str(sample / "aligned"), "--meta",
               str(sample / "meta.npz"), "--pool", str(sample / "aligned"),
               "--head", str(sample / "head.npz"),
               "--pool-cache", str(sample / "emb.npz"),
               "--cache", str(sample / "emb.npz"), "--fmrs", "1e-2,2e-2,1e-5", "--resamples", "20",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    q = json.loads((out / "quality.json").read_text())
    assert (sample / "head.npz").exists() and (out / "edc_fmr0.01.png").exists()
    assert not q["fmr"]["1e-05"]["supported"] and "unsupported" in q["fmr"]["1e-05"]["note"]
    ms = q["fmr"]["0.01"]["measures"]
    names = list(ms)
    assert names[0].startswith("model quality output") and q["reference"] == names[0]
    for wanted in ("CR-FIQA-style head on the embedding", "detector score", "face size (detector box)",
                   "embedding norm", "random"):
        assert wanted in ms
    for name, m in ms.items():
        b = m["bootstrap"]
        assert b["num_resamples"] == 20
        assert b["ci_low"]["pauc_0.3"] <= b["point"]["pauc_0.3"] <= b["ci_high"]["pauc_0.3"]
        assert (name == names[0]) == ("difference_to_reference" not in m)
    # FNMR at 0% discard is the same for every measure: one threshold, one set of pairs
    assert len({m["edc"]["fnmr"][0] for m in ms.values()}) == 1
    assert "Δ pAUC" in (out / "summary.md").read_text()
    # identity-balanced view (default --balance both): 12 people make 66 pairs of people, so FMR
    # 1e-2 (0.66 of a pair) is unsupported there and 2e-2 is supported
    assert q["balance"] == "both"
    bal = q["balanced"]
    assert bal["identity_pairs"] == 66 and bal["genuine_identities"] == 12
    assert not bal["fmr"]["0.01"]["supported"] and "identity pairs" in bal["fmr"]["0.01"]["note"]
    assert q["fmr"]["0.02"]["supported"] and bal["fmr"]["0.02"]["supported"]
    bms = bal["fmr"]["0.02"]["measures"]
    assert list(bms) == list(q["fmr"]["0.02"]["measures"])
    assert len({m["edc"]["fnmr"][0] for m in bms.values()}) == 1
    assert all(("difference_to_reference" in m) == (name != names[0]) for name, m in bms.items())
    # 5 images per person: every person has 10 genuine pairs and every pair of people 25
    # impostors, so balancing changes nothing (up to the rounding of the discarded count)
    plain_ref = q["fmr"]["0.02"]["measures"][names[0]]
    np.testing.assert_allclose(bms[names[0]]["edc"]["fnmr"][0], plain_ref["edc"]["fnmr"][0])
    assert bal["fmr"]["0.02"]["threshold"] == q["fmr"]["0.02"]["threshold"]
    assert (out / "edc_balanced_fmr0.02.png").exists() and (out / "edc_fmr0.02.png").exists()
    assert q["files"]["edc_plots_balanced"] == {"0.02": "edc_balanced_fmr0.02.png"}
    assert "Identity-balanced view" in (out / "summary.md").read_text()


def test_ood_uses_the_shipped_detector(sample):
    if not (MODEL / "ood.npz").exists():
        pytest.skip("model has no ood.npz")
    nonface = sample / "nonface" / "x"
    nonface.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        img = cv2.resize(rng.integers(0, 256, (2, 2, 3)).astype(np.uint8), (32, 32))
        cv2.imwrite(str(nonface / f"{i}.png"), img)
    out = sample / "ood"
    rc = main(["eval", "ood", str(MODEL), "--images", str(sample / "aligned"), "--ood",
               str(sample / "nonface"), "--limit", "24", "--out", str(out)])
    assert rc == 0
    r = json.loads((out / "ood.json").read_text())
    assert r["faces"] == 24 and set(r["families"]) >= {"nonface", "blur", "noise"}
    assert r["families"]["nonface"]["n"] == 12
    assert 0.0 <= r["families"]["nonface"]["auroc"] <= 1.0
    assert (out / "summary.md").exists()


def test_clear_errors(sample, capsys):
    with pytest.raises(SystemExit, match="either --bin or --images"):
        main(["eval", "verify", str(MODEL), "--bin", "x.bin", "--images", str(sample), "--out", "o"])
    with pytest.raises(SystemExit, match="give --images"):
        main(["eval", "quality", str(MODEL), "--out", str(sample / "q2")])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["eval", "verify", str(sample / "nope"), "--images", str(sample / "aligned"), "--out",
              str(sample / "v2"), "--no-progress"])
    with pytest.raises(SystemExit):
        main(["eval", "verify", str(MODEL), "--images", str(sample / "aligned"), "--fars", "a,b",
              "--out", "o"])
    assert "expected comma-separated numbers" in capsys.readouterr().err


def test_verify_writes_det_histograms_and_the_threshold_table(sample):
    out = sample / "verify_operating"
    rc = main(["eval", "verify", str(MODEL), "--images", str(sample / "aligned"), "--cache", str(sample / "emb1.npz"),
               "--threshold", "0.3", "--out", str(out), "--no-progress"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    op = m["all_pairs"]["operating_point"]
    e = _normalised(sample / "emb1.npz", flip=False)
    names = np.repeat(np.arange(12), 5)
    iu = np.triu_indices(60, 1)
    sims, same = (e @ e.T)[iu], names[iu[0]] == names[iu[1]]
    assert op["source"] == "given" and op["tar"] == pytest.approx(np.mean(sims[same] >= 0.3), abs=1e-6)
    assert op["far"] == pytest.approx(np.mean(sims[~same] >= 0.3), abs=1e-6)
    summary = (out / "summary.md").read_text()
    assert "| FAR (target) | threshold | TAR | FRR | FAR achieved |" in summary
    for f in ("det.png", "scores.png", "scores.json"):
        assert (out / f).exists(), f


def test_openset_cmc_and_det_at_fpir(sample):
    out = sample / "openset"
    rc = main(["eval", "openset", str(MODEL), "--images", str(sample / "aligned"), "--cache", str(sample / "emb1.npz"),
               "--fpirs", "0.1", "--ranks", "5", "--out", str(out), "--no-progress"])
    assert rc == 0
    r = json.loads((out / "openset.json").read_text())
    assert r["gallery_people"] == 6 and r["mated_searches"] == 6 * 4 and r["nonmated_searches"] == 6 * 5
    assert len(r["cmc"]) == 5 and r["cmc"] == sorted(r["cmc"]) and r["cmc"][-1] <= 1.0
    for f in ("summary.md", "det_fpir.json", "cmc.png", "det_fpir.png"):
        assert (out / f).exists(), f
    with pytest.raises(SystemExit, match="drop --pairs"):
        main(["eval", "openset", str(MODEL), "--images", str(sample / "aligned"), "--pairs",
              str(sample / "pairs.txt"), "--out", str(out)])


def test_the_validation_protocol_splits_its_one_fold_into_stratified_folds(tmp_path):
    """LFW fold 5 is one fold of pairs.txt: `--protocol validation` scores it by 10 stratified folds
    (as benchmarks/evaluate_lfw.py does) instead of failing on 'at least two folds'."""
    import argparse

    from facerec.cli.eval_data import load_dataset
    from facerec.data import protocol
    from facerec.eval.verification import kfold_accuracy

    data = os.environ.get("FACEREC_DATA")
    if not data or not protocol.has_lfw(data):
        pytest.skip("FACEREC_DATA with LFW's people.txt/pairs.txt is absent")
    people = protocol.validation_people(data)
    for path, name in protocol.lfw_images_of(people, data):  # empty stand-ins: only the paths are read
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / f"{path.stem}.jpg").touch()
    args = argparse.Namespace(bin=None, images=str(tmp_path), pairs=None, protocol="validation", data=data,
                              folds=10)
    pairs = load_dataset(args).pairs
    assert pairs.folds == 10 and pairs.a.size == 600 and pairs.same.sum() == 300
    rng = np.random.default_rng(0)
    scores = np.where(pairs.same, 0.6, 0.2) + rng.normal(0, 0.1, pairs.same.size)
    result = kfold_accuracy(scores, pairs.same, pairs.folds)
    assert result.accuracies.size == 10 and 0.9 < result.accuracies.mean() <= 1.0
