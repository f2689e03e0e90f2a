"""``facerec fit-ood`` core on tiny synthetic folders: a random-init export, sample faces."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

pytestmark = pytest.mark.timeout(300)

SAMPLE = Path(__file__).parent / "data" / "lfw_sample"


def _write(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    import torch

    from facerec.cli import fit_ood
    from facerec.contract import EmbeddingContract
    from facerec.data.align import center_crop
    from facerec.data.datasets import read_rgb
    from facerec.export import export_bundle
    from facerec.models import create_model

    tmp = tmp_path_factory.mktemp("fit_ood")
    torch.manual_seed(0)
    model = create_model("vit_tiny_fiqa", depth=1).eval()
    export_bundle(model, tmp / "export", model_name="vit_tiny_fiqa", overrides={"depth": 1}, version="t1",
                  fp16=False, torch_artifact=False, dynamo=False)
    contract = EmbeddingContract.from_json((tmp / "export" / "contract.json").read_text())
    graph = next((tmp / "export").glob("*.onnx"))
    features, names = fit_ood.onnx_features(graph)

    # "Aligned" faces: central crops of the sample images; people split into pool / val / test.
    people = sorted(p for p in SAMPLE.iterdir() if p.is_dir())
    faces: dict[str, list[Path]] = {}
    for person in people:
        faces[person.name] = [_write(tmp / "aligned" / person.name / f.name, center_crop(read_rgb(f), 112, 0.5))
                              for f in sorted(person.glob("*.jpg"))]
    pool = [(f, p.name) for p in people[:20] for f in faces[p.name][:3]]
    val = [f for p in people[20:27] for f in faces[p.name]]
    test = [f for p in people[27:] for f in faces[p.name]]
    rng = np.random.default_rng(0)
    # Non-faces: flat colours and smooth colour gradients, 32 px like CIFAR.
    cifar = []
    for i in range(16):
        base = rng.integers(0, 256, size=(2, 2, 3)).astype(np.uint8)
        cifar.append(_write(tmp / "nonface" / f"{i}.jpg", cv2.resize(base, (32, 32), interpolation=cv2.INTER_LINEAR)))
    det, report = fit_ood.fit_ood(features, contract.contract_id, pool, val, test, cifar[:8], cifar[8:],
                                  tpr=0.9, n_prototypes=2, min_identities=5, log=lambda *_: None)
    from facerec.ood import save

    save(det, tmp / "export" / "ood.npz")
    return {"tmp": tmp, "det": det, "report": report, "contract": contract, "features": features,
            "val": val, "names": names}


def test_npz_loads_with_its_contract_only(fitted):
    from facerec.contract import ContractMismatchError
    from facerec.ood import load

    path = fitted["tmp"] / "export" / "ood.npz"
    det = load(path, fitted["contract"])
    assert det.variant == "prototypes" and det.combiner is not None
    assert det.threshold == pytest.approx(fitted["det"].threshold) and det.target_tpr == 0.9
    assert len(det.layers) == len(fitted["names"])
    with pytest.raises(ContractMismatchError):
        load(path, "0123456789abcdef")


def test_threshold_meets_tpr_on_calibration_faces(fitted):
    from facerec.eval.calibration import load_batch
    from facerec.runtime.pipeline import FeatureListScorer

    det = fitted["det"]
    x = load_batch(fitted["val"])
    outputs = dict(zip(fitted["names"], fitted["features"](x)))
    scores = FeatureListScorer(det)(outputs)  # as the service scores a face
    assert np.mean(scores >= det.threshold) >= 0.9
    assert fitted["report"]["tpr_val"] >= 0.9
    assert set(fitted["report"]["families"]) == {"cifar", "blur", "noise", "occlusion", "brightness"}


def test_blank_and_noise_images_score_as_more_ood_than_faces(fitted):
    from facerec.eval.calibration import load_batch

    det, features = fitted["det"], fitted["features"]
    faces = det.score(features(load_batch(fitted["val"])))
    rng = np.random.default_rng(1)
    blank = np.zeros((4, 3, 112, 112), np.float32) + np.array([-1, 0, 0.5, 1], np.float32)[:, None, None, None]
    noise = rng.uniform(-1, 1, size=(4, 3, 112, 112)).astype(np.float32)
    for x in (blank, noise):
        assert det.score(features(x)).max() < np.median(faces)
