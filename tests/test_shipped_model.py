"""The shipped model's parts, recipe and card stay true to the code and to the measured results.

Model 2.1 is dlib's ResNet (the recognizer, CC0) and model 2.0's ViT-FIQA quality token in one graph
(``facerec import --dlib --quality-from``); the token's training configs and logs are kept in
``models/default/quality_token/``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "default"
TOKEN = MODEL / "quality_token"  # model 2.0's training record: the quality token's recipe
RESULTS = ROOT / "benchmarks" / "results" / "eval_lfw_dlib_fiqa_default.json"


def _missing(stored: dict, resolved: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in resolved.items():
        if key not in stored:
            out.append(prefix + key)
        elif isinstance(value, dict) and isinstance(stored[key], dict) and not key.endswith("kwargs"):
            out += _missing(stored[key], value, prefix + key + ".")
    return out


@pytest.mark.parametrize("name,quality_min_images", [("training_config_stage1.yaml", 1),
                                                      ("training_config_stage2.yaml", 2),
                                                      ("training_config.yaml", 2)])
def test_shipped_training_configs_name_every_field_of_the_schema(name, quality_min_images):
    """A field added to the schema later must not silently change the recipe of the shipped model
    (e.g. loss.quality_min_images defaults to 2, but stage 1 trained with 1)."""
    from training.config import Config

    stored = yaml.safe_load((TOKEN / name).read_text())
    resolved = Config.model_validate(stored).model_dump()
    assert _missing(stored, resolved) == [], "add these, with the values the shipped model used"
    assert resolved["loss"]["quality_min_images"] == quality_min_images


def test_vit_config_keeps_the_shipped_models_margin_whatever_its_base_says():
    """pool_vit_tiny_fiqa.yaml inherits from pool_mobilefacenet.yaml, whose default margin follows the
    CPU comparison; the ViT recipe that made the shipped model must not move with it."""
    from training.__main__ import config_path
    from training.config import load_config

    shipped = yaml.safe_load((TOKEN / "training_config_stage1.yaml").read_text())["loss"]
    loss = load_config(config_path("pool_vit_tiny_fiqa")).loss
    assert (loss.margin, loss.margin_kwargs, loss.unpg) == (shipped["margin"], shipped["margin_kwargs"], shipped["unpg"])
    assert load_config(config_path("pool_mobilefacenet")).loss.margin != shipped["margin"]  # the base did move


def test_manifest_matches_the_graph_and_its_contract():
    import hashlib

    manifest = json.loads((MODEL / "manifest.json").read_text())
    contract = json.loads((MODEL / "contract.json").read_text())
    for name, digest in manifest["files"].items():
        assert digest == "sha256:" + hashlib.sha256((MODEL / name).read_bytes()).hexdigest(), name
    assert manifest["contract_id"] == contract["contract_id"]
    assert manifest["version"] == contract["model_version"]
    card = (MODEL / "MODEL_CARD.md").read_text()
    assert f"`{contract['contract_id']}`" in card and f" {manifest['version']} (" in card.splitlines()[0]
    assert sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file()) < 25e6  # the size budget


def test_model_card_validation_and_lfw_h2_rows_match_the_results_file():
    card = (MODEL / "MODEL_CARD.md").read_text()
    ev = json.loads(RESULTS.read_text())
    for split, row in (("validation", r"\| validation \(LFW fold 5[^|]*\|[^|]*\| ([\d.]+)% ± ([\d.]+) \|"),
                       ("lfw_h2", r"\| \*\*LFW-H2\*\*[^|]*\|[^|]*\| \*\*([\d.]+)% ± ([\d.]+)\*\* \|")):
        match = re.search(row, card)
        assert match, f"no {split} row in the model card"
        assert float(match[1]) == pytest.approx(100 * ev[split]["accuracy_mean"], abs=0.005)
        assert float(match[2]) == pytest.approx(100 * ev[split]["accuracy_std"], abs=0.005)


def test_card_and_readme_tar_and_threshold_match_the_results():
    card = (MODEL / "MODEL_CARD.md").read_text()
    readme = (ROOT / "README.md").read_text()
    manifest = json.loads((MODEL / "manifest.json").read_text())
    ev = json.loads(RESULTS.read_text())
    for split in ("validation", "lfw_h2"):
        tars = {t["far"]: t["tar"] for t in ev[split]["tar_at_far"]}
        row = "| 600 |" if split == "validation" else "| 3,000 |"
        line = next(x for x in card.splitlines() if row in x and not x.startswith("| *model"))
        for far in (1e-2, 1e-3, 1e-4):
            assert f"{100 * tars[far]:.2f}%" in line, (split, far, line)
    h2 = ev["lfw_h2"]
    assert f"{100 * h2['accuracy_mean']:.2f}% ± {100 * h2['accuracy_std']:.2f}" in readme
    assert f"TAR {100 * {t['far']: t['tar'] for t in h2['tar_at_far']}[1e-2]:.2f}% at FAR 1e-2" in readme
    # the threshold the service ships is the one written into the graph by `facerec calibrate`
    import onnx

    (graph,) = manifest["files"]
    meta = {p.key: p.value for p in onnx.load(str(MODEL / graph), load_external_data=False).metadata_props}
    threshold = float(meta["facerec.verification_threshold"])
    assert manifest["verification"]["threshold"] == pytest.approx(threshold, abs=5e-5)
    assert f"threshold {threshold:.4f}" in card



def test_the_graph_is_dlibs_recognizer_with_model_20s_quality_token():
    """One graph, two parts, each recorded: the recognizer's licence travels with it, the token is the
    2.0 graph's (its contract id), and every file fitted on the model names the model's contract."""
    import numpy as np

    from facerec.bundle import ModelBundle
    from facerec.contract import DLIB_CHIP_150, DLIB_CHIP_CANVAS_192

    model = ModelBundle(MODEL)
    contract = model.contract()
    assert (contract.alignment, contract.input_size, contract.embedding_size) == (DLIB_CHIP_CANVAS_192, 192, 128)
    parts = contract.extra["combined_from"]
    assert parts["recognizer"]["alignment"] == DLIB_CHIP_150 and "CC0" in parts["recognizer"]["licence"]
    assert (parts["quality"]["model_name"], parts["quality"]["contract_id"]) == ("vit_tiny_fiqa", "dbbffd98348a4cc0")
    assert parts["weights"].startswith("fp16")
    meta = model.metadata()
    assert json.loads(meta["facerec.output_names"]) == ["embedding", "quality"]
    cal = model.calibration(contract.contract_id)
    assert cal.threshold is not None and cal.far == 1e-3 and len(cal.quality_percentiles) == 101
    assert json.loads((MODEL / "openset.json").read_text())["contract_id"] == contract.contract_id
    with np.load(MODEL / "ood.npz", allow_pickle=False) as z:
        assert str(z["contract_id"]) == contract.contract_id
    card = (MODEL / "MODEL_CARD.md").read_text()
    assert "Davis King" in card and "CC0" in card and "research use only" in card
