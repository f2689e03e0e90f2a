"""An imported model (the shipped model's graph re-imported: only an embedding output) gets what our
own models have: a quality measure (``facerec fit-quality``), an OOD detector on the embedding
(``facerec fit-ood``), and ``facerec eval`` numbers identical to the source graph's.

The bundled LFW sample is aligned once; its first 16 people are the pool (the CR-FIQA-style head's
training data, the OOD statistics), the other 16 the validation set (``--protocol none``). The EDC
choice is checked against a brute-force EDC written here, the service's quality and OOD answers
against the stored measure and detector.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from facerec.cli import main

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[1]
MODEL = Path(os.environ.get("FACEREC_MODEL") or REPO / "models" / "default")
KEY = {"X-API-Key": "test-key-0123456789abcdef"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not any(MODEL.glob("*.onnx")):
        pytest.skip(f"no exported model at {MODEL}")
    from facerec.bundle import find_graph
    from sample_helpers import align_sample, sample_people

    from facerec.bundle import ModelBundle

    tmp = tmp_path_factory.mktemp("fit_quality")
    people = sample_people()
    contract = ModelBundle(MODEL).contract()  # the source's crop, which the re-imported graph keeps
    aligned, meta = align_sample(tmp, people, contract.alignment, contract.input_size)
    for tree, group in (("pool", people[:16]), ("val", people[16:])):
        for name in group:
            shutil.copytree(aligned / name, tmp / tree / name)
    assert main(["import", str(find_graph(MODEL)), "--out", str(tmp / "imported"), "--name", "reimported"]) == 0
    return tmp, meta


def _fit(tmp: Path, meta: Path, *extra) -> int:
    return main(["fit-quality", str(tmp / "imported"), "--images", str(tmp / "val"), "--protocol", "none",
                 "--pool", str(tmp / "pool"), "--meta", str(meta), "--fmr", "1e-2", "--cache",
                 str(tmp / "val_emb.npz"), "--pool-cache", str(tmp / "pool_emb.npz"), "--no-progress", *extra])


def _embeddings(folder: Path, paths: list[Path]) -> np.ndarray:
    import onnxruntime as ort

    from facerec.bundle import find_graph
    from facerec.data.datasets import read_rgb

    session = ort.InferenceSession(str(find_graph(folder)), providers=["CPUExecutionProvider"])
    x = ((np.stack([read_rgb(p) for p in paths]).astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)
    return session.run(["embedding"], {"input": np.ascontiguousarray(x)})[0].astype(np.float64)


def brute_force_pauc(emb: np.ndarray, names: list[str], q: np.ndarray, fmr: float, upper: float = 0.3) -> float:
    """EDC by the book: every pair, threshold = the (floor(fmr * N) + 1)-th highest impostor, genuine
    pairs dropped lowest min-quality first (stable), mean FNMR over discard 0, 0.01, .., upper."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    genuine, impostor, pair_q = [], [], []
    for i in range(len(e)):
        for j in range(i + 1, len(e)):
            s = float(e[i] @ e[j])
            if names[i] == names[j]:
                genuine.append(s)
                pair_q.append(min(q[i], q[j]))
            else:
                impostor.append(s)
    threshold = sorted(impostor, reverse=True)[math.floor(fmr * len(impostor))]
    errors = [g <= threshold for _, g in sorted(zip(pair_q, genuine), key=lambda t: t[0])]
    steps = np.round(np.arange(0, upper + 1e-9, 0.01), 10)
    fnmr = [np.mean(errors[math.floor(u * len(errors) + 1e-9):]) for u in steps]
    return float(np.trapezoid(fnmr, steps) / upper)


def test_choice_is_the_lowest_edc_among_the_three_candidates(setup, capsys):
    from facerec.bundle import ModelBundle
    from facerec.eval.face_meta import FaceMeta
    from facerec.runtime.quality import QualityFallback

    tmp, meta = setup
    assert _fit(tmp, meta) == 0
    out = capsys.readouterr().out
    folder = ModelBundle(tmp / "imported")
    report = json.loads(folder.quality_report_path.read_text())
    rows = report["candidates"]
    assert set(rows) == {"embedding_norm", "crfiqa_head", "detector_score"}
    assert report["method"] == min(rows, key=lambda n: rows[n]["pauc"]) and f"{report['method']}" in out
    fallback = QualityFallback.load(folder.quality_path, folder.contract().contract_id)
    assert fallback.method == report["method"] and len(fallback.percentiles) == 101

    keys = sorted(str(p.relative_to(tmp / "val")) for p in (tmp / "val").glob("*/*.jpg"))
    names = [k.split("/")[0] for k in keys]
    emb = _embeddings(tmp / "imported", [tmp / "val" / k for k in keys])
    norms = np.linalg.norm(emb, axis=1)
    det = FaceMeta.load(meta).select(keys).score
    assert rows["embedding_norm"]["pauc"] == pytest.approx(brute_force_pauc(emb, names, norms, 1e-2), abs=1e-6)
    assert rows["detector_score"]["pauc"] == pytest.approx(brute_force_pauc(emb, names, det, 1e-2), abs=1e-6)
    chosen = {"embedding_norm": norms, "detector_score": det}.get(fallback.method)
    if chosen is not None:  # the 0-100 mapping: percentiles of the chosen measure on the validation faces
        np.testing.assert_allclose(fallback.percentiles, np.percentile(chosen, np.arange(101)), rtol=1e-9)

    # The head, asked for by name: the same candidate numbers, its own stored head, its pAUC by the book.
    assert _fit(tmp, meta, "--method", "crfiqa_head") == 0
    again = json.loads(folder.quality_report_path.read_text())
    assert again["candidates"] == rows and again["method"] == "crfiqa_head"
    assert again["chosen_by"].startswith("--method crfiqa_head")
    head = QualityFallback.load(folder.quality_path, folder.contract().contract_id)
    assert head.head is not None and head.head.info["pool_images"] == 80
    q = head.head.predict(emb)
    assert rows["crfiqa_head"]["pauc"] == pytest.approx(brute_force_pauc(emb, names, q, 1e-2), abs=1e-6)


@pytest.mark.parametrize("method", ["embedding_norm", "detector_score", "crfiqa_head"])
def test_service_reports_the_fitted_measure(setup, method):
    from fastapi.testclient import TestClient

    from facerec.bundle import ModelBundle
    from facerec.runtime.quality import QualityFallback
    from service.app import create_app
    from service.settings import Settings
    from service.testing import SAMPLES, wait_ready

    tmp, meta = setup
    assert _fit(tmp, meta, "--method", method) == 0
    folder = ModelBundle(tmp / "imported")
    fallback = QualityFallback.load(folder.quality_path, folder.contract().contract_id)
    photo = (SAMPLES / "Adrien_Brody/Adrien_Brody_0001.jpg").read_bytes()
    settings = Settings(model=folder.folder, api_keys=[KEY["X-API-Key"]], device="cpu")
    with TestClient(create_app(settings, announce_key=False)) as client:
        wait_ready(client.get)
        q = client.post("/v1/quality", files={"image": photo}, headers=KEY).json()
        e = client.post("/v1/embed", files={"image": photo}, headers=KEY).json()
        models = client.get("/v1/models", headers=KEY).json()
    raw = np.asarray(e["embedding"]) * e["embedding_norm"]
    want = {"embedding_norm": e["embedding_norm"], "detector_score": q["face"]["score"],
            "crfiqa_head": None if fallback.head is None else float(fallback.head.predict(raw[None])[0])}[method]
    assert q["quality"]["method"] == method and e["quality"]["method"] == method
    assert q["quality"]["raw"] == pytest.approx(want, rel=1e-5)
    percentile = np.interp(want, fallback.percentiles, np.linspace(0, 100, 101))
    assert q["quality"]["score"] == pytest.approx(percentile, abs=1e-3)
    assert models["quality"]["method"] == method and models["quality"]["head"] is False
    assert models["quality"]["percentile_mapping"] is True
    assert set(models["quality"]["candidates"]) == {"embedding_norm", "crfiqa_head", "detector_score"}


def test_a_measure_of_another_model_is_refused_and_a_quality_head_keeps_its_own(setup, capsys):
    from facerec.bundle import ModelBundle, find_graph
    from facerec.contract import ContractMismatchError
    from facerec.runtime import FacePipeline, OnnxRuntimeBackend
    from facerec.runtime.quality import QualityFallback

    tmp, meta = setup
    assert _fit(tmp, meta, "--method", "embedding_norm") == 0
    folder = ModelBundle(tmp / "imported")
    fallback = QualityFallback.load(folder.quality_path, folder.contract().contract_id)
    with pytest.raises(ContractMismatchError):
        QualityFallback.load(folder.quality_path, "0123456789abcdef")
    # Our own graph: it has a quality output, so no fallback is taken, and fit-quality refuses it.
    with pytest.raises(ValueError, match="its own quality output"):
        FacePipeline(OnnxRuntimeBackend(find_graph(MODEL), device="cpu"), quality_fallback=fallback)
    capsys.readouterr()
    rc = None
    try:
        rc = main(["fit-quality", str(MODEL), "--images", str(tmp / "val"), "--protocol", "none"])
    except SystemExit as err:
        rc = err.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "has its own quality output" in err and "\n" not in err


def _crops(tree: Path) -> np.ndarray:
    from facerec.data.datasets import read_rgb

    return np.stack([read_rgb(p) for p in sorted(tree.glob("*/*.jpg"))])


def test_ood_on_the_embedding_is_fitted_saved_and_served(setup):
    import cv2
    from fastapi.testclient import TestClient

    from facerec.bundle import ModelBundle, find_graph
    from facerec.cli.fit_ood import fit_statistics
    from facerec.eval.ood_study import driver
    from facerec.eval.ood_study.scoring import evaluate
    from facerec.ood import load, save
    from service.app import create_app
    from service.settings import Settings
    from service.testing import SAMPLES, wait_ready

    tmp, _ = setup
    folder = ModelBundle(tmp / "imported")
    contract = folder.contract()
    run, names, _ = driver.onnx_runner(find_graph(folder.folder))
    assert names == ["embedding"]  # all an imported graph exposes
    pool = [(p, p.parent.name) for p in sorted((tmp / "pool").glob("*/*.jpg"))]
    det, _ = fit_statistics(run, contract.contract_id, pool, n_prototypes=2, min_identities=5)
    faces = {"val": _crops(tmp / "val")[:40], "test": _crops(tmp / "val")[40:]}
    rng = np.random.default_rng(0)
    sets = {}
    for split, f in faces.items():
        size = f.shape[1]  # the model's crop
        flat = np.stack([cv2.resize(rng.integers(0, 256, (2, 2, 3)).astype(np.uint8), (size, size)) for _ in f])
        noise = np.clip(f + rng.normal(0, 60, f.shape), 0, 255).astype(np.uint8)
        sets[split] = {n: {"crops": c, "offered": np.array(len(c)), "source": np.arange(len(c))}
                       for n, c in (("faces", f), ("flat", flat), ("noise", noise))}
    feats = {s: {n: driver.crop_features(run, v["crops"]) for n, v in d.items()} for s, d in sets.items()}
    sv, st = ({n: driver.layer_scores(det, f) for n, f in feats[s].items()} for s in ("val", "test"))
    result = evaluate(sv, st, sets["test"], {n: f["emb"] for n, f in feats["test"].items()}, tpr=0.9)
    # Flat colour fields rank below faces. How far depends on the model: 2.0's ViT embedding put
    # them far from every face (AUROC > 0.9 here); dlib's descriptor (2.1) maps them closer to faces
    # (0.61 with this 16-person sample and 2 prototypes), and the service's detector adds MTCNN's
    # confidence, which turns most such fields away before they are scored.
    assert result["rows"]["flat"]["auroc"] > 0.55
    det.combiner, det.threshold, det.target_tpr = result["combiner"], result["threshold"], 0.9
    det.meta["layer_outputs"] = names
    save(det, folder.ood_path)
    assert load(folder.ood_path, contract).meta["layer_outputs"] == ["embedding"]

    photo = (SAMPLES / "Adrien_Brody/Adrien_Brody_0001.jpg").read_bytes()
    settings = Settings(model=folder.folder, api_keys=[KEY["X-API-Key"]], device="cpu")
    with TestClient(create_app(settings, announce_key=False)) as client:
        wait_ready(client.get)
        e = client.post("/v1/embed", files={"image": photo}, headers=KEY).json()
        models = client.get("/v1/models", headers=KEY).json()
    raw = (np.asarray(e["embedding"]) * e["embedding_norm"])[None]
    want = float(det.score([raw])[0])  # no detection layer: the embedding's score alone
    assert e["ood"]["score"] == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert e["ood"]["flagged"] == (want < det.threshold)
    assert models["ood"]["layer_outputs"] == ["embedding"] and models["ood"]["layers"] == 1


def test_fit_ood_cli_without_torch_weights(setup):
    """End to end on the shared data (FACEREC_DATA: LFW, CIFAR), tiny sample sizes: no attack sets."""
    from facerec.data import protocol

    if not os.environ.get("FACEREC_DATA") or not protocol.has_lfw():
        pytest.skip("FACEREC_DATA with lfw/ and cifar10_ood/ is absent")
    tmp, _ = setup
    folder = tmp / "imported_ood"
    shutil.copytree(tmp / "imported", folder)
    (folder / "ood.npz").unlink(missing_ok=True)
    rc = main(["fit-ood", str(folder), "--aligned-pool", str(tmp / "pool"), "--cache", str(tmp / "ood_cache"),
               "--faces", "80", "--attacked", "8", "--attacked-val", "8", "--cifar", "8", "--skimage-crops", "1",
               "--pool-images", "80", "--n-prototypes", "2", "--min-identities", "5", "--tpr", "0.9"])
    assert rc == 0
    report = json.loads((folder / "ood_report.json").read_text())
    assert report["layer_outputs"] == ["embedding"] and report["checkpoint"] is None
    assert report["attacks"].startswith("none") and report["inputs"]["domains"] == []
    assert not any(n.split("@")[0] in ("fgsm", "pgd", "impersonation", "adaptive") for n in report["rows"])
    assert {"cifar", "skimage", "blur"} <= set(report["rows"])
    from facerec.bundle import ModelBundle
    from facerec.ood import load

    det = load(folder / "ood.npz", ModelBundle(folder).contract())
    assert det.meta["layer_outputs"] == ["embedding"] and det.threshold is not None


def test_eval_of_the_reimported_model_gives_the_source_numbers(setup):
    from sample_helpers import sample_people, write_sample_pairs

    tmp, _ = setup
    write_sample_pairs(tmp / "pairs.txt", sample_people()[:12])
    out = {}
    for name, model in (("source", MODEL), ("imported", tmp / "imported")):
        assert main(["eval", "verify", str(model), "--images", str(tmp / "aligned"), "--pairs",
                     str(tmp / "pairs.txt"), "--flip", "--fars", "1e-2,1e-3", "--cache", str(tmp / f"emb_{name}.npz"),
                     "--out", str(tmp / f"eval_{name}"), "--no-progress"]) == 0
        out[name] = tmp / f"eval_{name}"
    a, b = (json.loads((out[n] / "metrics.json").read_text()) for n in ("source", "imported"))
    assert a.pop("model") != b.pop("model")  # the graph's file name, and only that, differs
    assert a == b and a["pair_list"]["pairs"] == 24
    for f in ("roc.json", "scores.json"):
        assert (out["source"] / f).read_bytes() == (out["imported"] / f).read_bytes(), f
    np.testing.assert_array_equal(np.load(tmp / "emb_source.npz")["embedding"],
                                  np.load(tmp / "emb_imported.npz")["embedding"])


@pytest.mark.parametrize("method", ["embedding_norm", "detector_score"])
def test_an_aligned_input_has_no_detector_score_quality(setup, method):
    from facerec.bundle import ModelBundle, find_graph
    from facerec.runtime import FacePipeline, OnnxRuntimeBackend
    from facerec.runtime.quality import QualityFallback

    tmp, _ = setup
    folder = ModelBundle(tmp / "imported")
    fallback = QualityFallback(method, folder.contract().contract_id, np.linspace(0, 1, 101), "test")
    pipeline = FacePipeline(OnnxRuntimeBackend(find_graph(folder.folder), device="cpu"), quality_fallback=fallback)
    crop = next((tmp / "val").glob("*/*.jpg")).read_bytes()  # an aligned 112x112 crop: no detection, no score
    face = pipeline.process(crop, aligned=True).faces[0]
    assert np.isnan(face.det_score)
    assert face.quality == (pytest.approx(face.embedding_norm) if method == "embedding_norm" else None)
