"""``facerec fit-ood`` core on tiny synthetic sets: a random-init export, sample faces."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from facerec.bundle import find_graph

pytestmark = pytest.mark.timeout(300)

SAMPLE = Path(__file__).parent / "data" / "lfw_sample"


def _write(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def _set(crops) -> dict:
    crops = np.asarray(crops, np.uint8)
    return {"crops": crops, "offered": np.array(len(crops)), "source": np.arange(len(crops))}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    import torch

    from facerec.cli import fit_ood
    from facerec.contract import EmbeddingContract
    from facerec.data.align import center_crop
    from facerec.data.datasets import read_rgb
    from facerec.eval.ood_study import driver
    from facerec.eval.ood_study.scoring import evaluate
    from facerec.export import export_bundle
    from facerec.models import create_model
    from facerec.ood import save

    tmp = tmp_path_factory.mktemp("fit_ood")
    torch.manual_seed(0)
    model = create_model("vit_tiny_fiqa", depth=1).eval()
    export_bundle(
        model,
        tmp / "export",
        model_name="vit_tiny_fiqa",
        overrides={"depth": 1},
        version="t1",
        fp16=False,
        torch_artifact=False,
        dynamo=False,
    )
    contract = EmbeddingContract.from_json((tmp / "export" / "contract.json").read_text())
    graph = find_graph(tmp / "export")
    run, names, meta = driver.onnx_runner(graph)
    one_sided = fit_ood.one_sided_layers(meta, len(names))

    # "Aligned" faces: central crops of the sample images; people split into pool / val / test.
    people = sorted(p for p in SAMPLE.iterdir() if p.is_dir())
    crops = {p.name: [center_crop(read_rgb(f), 112, 0.5) for f in sorted(p.glob("*.jpg"))] for p in people}
    pool = [
        (_write(tmp / "pool" / p.name / f"{i}.jpg", c), p.name)
        for p in people[:20]
        for i, c in enumerate(crops[p.name][:3])
    ]
    val = np.stack([c for p in people[20:26] for c in crops[p.name]])
    test = np.stack([c for p in people[26:] for c in crops[p.name]])
    rng = np.random.default_rng(0)

    def nonfaces(n):  # flat colours and smooth gradients, 32 px like CIFAR, upsampled
        return [
            cv2.resize(rng.integers(0, 256, size=(2, 2, 3)).astype(np.uint8), (112, 112)) for _ in range(n)
        ]

    def noisy(x):
        return np.clip(x + rng.normal(0, 40, x.shape), 0, 255).astype(np.uint8)

    det, _ = fit_ood.fit_statistics(
        run, contract.contract_id, pool, one_sided, n_prototypes=2, min_identities=5
    )
    sets = {
        "val": {"faces": _set(val), "cifar": _set(nonfaces(12)), "noise": _set(noisy(val))},
        "test": {
            "faces": _set(test),
            "cifar": _set(nonfaces(12)),
            "noise": _set(noisy(test)),
            "ctl_grey": _set(np.repeat(test.mean(3, keepdims=True).round(), 3, axis=3)),
        },
    }
    feats = {s: {n: driver.crop_features(run, v["crops"]) for n, v in d.items()} for s, d in sets.items()}
    sv = {n: driver.layer_scores(det, f) for n, f in feats["val"].items()}
    st = {n: driver.layer_scores(det, f) for n, f in feats["test"].items()}
    result = evaluate(sv, st, sets["test"], {n: f["emb"] for n, f in feats["test"].items()}, tpr=0.9)
    det.combiner, det.threshold, det.target_tpr = result["combiner"], result["threshold"], 0.9
    save(det, tmp / "export" / "ood.npz")
    return {
        "tmp": tmp,
        "det": det,
        "result": result,
        "contract": contract,
        "run": run,
        "names": names,
        "meta": meta,
        "one_sided": one_sided,
        "val": val,
        "test": test,
        "st": st,
    }


def test_graph_marks_the_pixel_statistics_layer_and_the_fit_makes_it_one_sided(fitted):
    from facerec.models.pixel_stats import PIXEL_STATS_DIM

    kinds = json.loads(fitted["meta"]["facerec.feature_kinds"])
    assert kinds == ["tokens"] * (len(fitted["names"]) - 1) + ["pixel_stats"]
    assert json.loads(fitted["meta"]["facerec.feature_dims"])[-1] == PIXEL_STATS_DIM
    assert fitted["one_sided"] == [len(kinds) - 1]
    det = fitted["det"]
    assert det.layers[-1].floor is not None and all(g.floor is None for g in det.layers[:-1])


def test_npz_loads_with_its_contract_only(fitted):
    from facerec.contract import ContractMismatchError
    from facerec.ood import load

    path = fitted["tmp"] / "export" / "ood.npz"
    det = load(path, fitted["contract"])
    assert det.variant == "prototypes" and det.combiner is not None
    assert det.threshold == pytest.approx(fitted["det"].threshold) and det.target_tpr == 0.9
    assert len(det.layers) == len(fitted["names"])
    np.testing.assert_array_equal(det.layers[-1].floor, fitted["det"].layers[-1].floor)
    with pytest.raises(ContractMismatchError):
        load(path, "0123456789abcdef")


def test_threshold_meets_tpr_on_calibration_faces_as_the_service_scores_them(fitted):
    from facerec.eval.ood_study.families import to_input
    from facerec.runtime.pipeline import FeatureListScorer

    det = fitted["det"]
    feats, _ = fitted["run"](to_input(fitted["val"]).numpy())
    scores = FeatureListScorer(det)(dict(zip(fitted["names"], feats)))  # as the service scores a face
    assert np.mean(scores >= det.threshold) >= 0.9
    assert fitted["result"]["tpr_val"] >= 0.9


def test_report_rows_and_grey_faces_are_not_penalised_by_the_pixel_layer(fitted):
    from facerec.cli.fit_ood import markdown

    rows = fitted["result"]["rows"]
    assert set(rows) == {"cifar", "noise", "ctl_grey"}
    assert rows["noise"]["auroc"] > 0.9 and rows["noise"]["held_out"]["auroc"] > 0.9
    assert "pass_rate_at_threshold" in rows["ctl_grey"] and "auroc" not in rows["ctl_grey"]
    # The pixel layer is one-sided: a grey face's chroma statistics (log δ, no chroma energy) lie
    # below the floor, so they count as typical: its score is the one with chroma at the floor.
    from facerec.eval.ood_study.families import to_input
    from facerec.models.pixel_stats import pixel_stats_names

    det = fitted["det"]
    grey = fitted["run"](
        to_input(np.repeat(fitted["test"].mean(3, keepdims=True).round(), 3, axis=3).astype(np.uint8)).numpy()
    )[0][-1].astype(np.float64)
    chroma = [i for i, n in enumerate(pixel_stats_names()) if "/Y/" not in n]
    layer = det.layers[-1]
    assert np.all(grey[:, chroma] < layer.floor[chroma])
    at_floor = grey.copy()
    at_floor[:, chroma] = layer.floor[chroma]
    np.testing.assert_allclose(layer.scores(grey).numpy(), layer.scores(at_floor).numpy(), rtol=1e-12)
    np.testing.assert_allclose(fitted["st"]["ctl_grey"][:, -1], layer.scores(grey).numpy(), rtol=1e-5)
    report = {
        "command": "facerec fit-ood x",
        "pool_images": 60,
        "pool_people": 20,
        "prototypes_per_layer": [2],
        "min_identities_per_prototype": 5,
        "feature_dims": [192, 27],
        "one_sided_layers": [1],
        "val_faces": 30,
        "test_faces": 30,
        "graph": "g.onnx",
        "threshold": fitted["det"].threshold,
        "tpr_target": 0.9,
        "tpr_val": 0.9,
        "tpr_test": fitted["result"]["tpr_test"],
        "rows": rows,
        "verification_threshold": 0.36,
        "seconds": 1.0,
        "ceiling_quantile": 0.5,
        "ceiling_table": {"None": 0.9, "0.5": 0.95},
        "cache": {"computed": 1, "loaded": 2},
    }
    text = markdown(report)
    assert "| noise | 30 | 0 | 30 |" in text and "| ctl_grey | 30 | 0 |" in text


def test_blank_and_noise_images_score_as_more_ood_than_faces(fitted):
    from facerec.eval.ood_study.families import to_input

    det, run = fitted["det"], fitted["run"]
    faces = det.score(run(to_input(fitted["val"]).numpy())[0])
    rng = np.random.default_rng(1)
    blank = (
        np.zeros((4, 3, 112, 112), np.float32) + np.array([-1, 0, 0.5, 1], np.float32)[:, None, None, None]
    )
    noise = rng.uniform(-1, 1, size=(4, 3, 112, 112)).astype(np.float32)
    for x in (blank, noise):
        assert det.score(run(x)[0]).max() < np.median(faces)


def test_cli_explains_the_checkpoint_and_defaults_to_the_folders_weights(capsys):
    from facerec.cli import fit_ood

    parser = argparse.ArgumentParser(prog="facerec fit-ood", description=fit_ood.HELP)
    fit_ood.add_arguments(parser)
    with pytest.raises(SystemExit) as err:
        parser.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert err.value.code == 0 and "--checkpoint" in help_text and "folder's torch artefact" in help_text
    # Optional since imported folders exist: the folder's torch artefact, else no attacks.
    assert parser.parse_args(["models/default", "--aligned-pool", "p"]).checkpoint is None
    with pytest.raises(SystemExit) as err:
        parser.parse_args(["models/default"])
    assert err.value.code == 2 and "--aligned-pool" in capsys.readouterr().err


def test_attack_weights_are_the_folders_artefact_and_must_be_the_graphs_model(fitted):
    import torch

    from facerec.bundle import ModelBundle
    from facerec.cli.fit_ood import attack_model
    from facerec.export.torch_artifact import resolve_model, save_torch_artifact
    from facerec.models import create_model

    folder = ModelBundle(fitted["tmp"] / "export")
    run, names = fitted["run"], fitted["names"]
    args = argparse.Namespace(checkpoint=None, seed=0)
    assert attack_model(args, folder, run, names) is None and args.checkpoint is None  # no *.pt: no attacks
    torch.manual_seed(0)  # the fixture's weights
    same = create_model("vit_tiny_fiqa", depth=1).eval()
    save_torch_artifact(resolve_model(("vit_tiny_fiqa", {"depth": 1}, same.state_dict())), folder.folder / "m.pt",
                        fitted["contract"], names)
    args = argparse.Namespace(checkpoint=None, seed=0)
    source = attack_model(args, folder, run, names)
    assert source is not None and args.checkpoint == str(folder.folder / "m.pt")
    torch.manual_seed(1)
    other = create_model("vit_tiny_fiqa", depth=1).eval()
    save_torch_artifact(resolve_model(("vit_tiny_fiqa", {"depth": 1}, other.state_dict())), fitted["tmp"] / "other.pt",
                        fitted["contract"], names)
    with pytest.raises(SystemExit, match="is not the graph's model"):
        attack_model(argparse.Namespace(checkpoint=str(fitted["tmp"] / "other.pt"), seed=0), folder, run, names)
    (folder.folder / "m.pt").unlink()


def test_shipped_detector_scores_service_faces_with_their_mtcnn_confidence():
    """The shipped ood.npz reads MTCNN's confidence as its last column, and the service's pipeline
    scores a face with exactly the detector's formula on that face's features and confidence."""
    from facerec.contract import EmbeddingContract
    from facerec.ood import DetectionLayer, load
    from facerec.runtime import (
        DEFAULT_FACE_DETECTOR,
        FacePipeline,
        FeatureListScorer,
        load_backend,
    )

    folder = Path(__file__).parents[1] / "models" / "default"
    contract = EmbeddingContract.from_json((folder / "contract.json").read_text())
    det = load(folder / "ood.npz", contract)
    assert det.detection is not None and det.detection.detector == DEFAULT_FACE_DETECTOR == "mtcnn"
    assert len(det.combiner.weights) == det.n_columns == len(det.layers) + 1
    assert det.combiner.weights[-1] > 0  # a more confident detection can only look more face-like
    backend = load_backend(find_graph(folder))
    pipeline = FacePipeline(backend, ood_scorer=FeatureListScorer(det, DEFAULT_FACE_DETECTOR), keep_features=True)
    face = pipeline.process(next(SAMPLE.glob("*/*.jpg")).read_bytes()).faces[0]
    # The layers read the outputs fit-ood recorded: the feature taps, or (an imported recognizer such
    # as 2.1's dlib ResNet) the raw embedding, which the face carries as unit vector times norm.
    names = det.meta.get("layer_outputs") or [f"feature_{i}" for i in range(len(det.layers))]
    assert len(names) == len(det.layers)
    feats = [(face.embedding * face.embedding_norm if n == "embedding" else face.features[n])[None]
             for n in names]
    # (1e-6: the embedding rebuilt from its float32 unit vector and norm rounds in the 8th digit)
    assert face.ood == pytest.approx(float(det.score(feats, [face.det_score])[0]), rel=1e-6)
    cols = det.layer_scores(feats, [face.det_score]).numpy()[0]
    assert cols[-1] == pytest.approx(float(DetectionLayer.logit(face.det_score)))
    # A borderline detection of the same crop (as non-faces that pass MTCNN get) lowers the score.
    assert det.score(feats, [0.8])[0] < face.ood
