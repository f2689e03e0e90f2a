import pytest

from facerec.contract import ContractMismatchError, EmbeddingContract, require_same_contract


def test_contract_id_is_stable_and_sensitive_to_every_field():
    base = EmbeddingContract("vit_tiny_fiqa", "1", 512)
    assert base.contract_id == EmbeddingContract("vit_tiny_fiqa", "1", 512).contract_id
    changed = [
        EmbeddingContract("vit_s_fiqa", "1", 512),
        EmbeddingContract("vit_tiny_fiqa", "2", 512),
        EmbeddingContract("vit_tiny_fiqa", "1", 256),
        EmbeddingContract("vit_tiny_fiqa", "1", 512, colour_order="BGR"),
        EmbeddingContract("vit_tiny_fiqa", "1", 512, mean=(0.0, 0.0, 0.0)),
        EmbeddingContract("vit_tiny_fiqa", "1", 512, alignment="other"),
    ]
    ids = {c.contract_id for c in changed} | {base.contract_id}
    assert len(ids) == len(changed) + 1
    # extra information does not change what the embedding means
    assert EmbeddingContract("vit_tiny_fiqa", "1", 512, extra={"note": "x"}).contract_id == base.contract_id


def test_json_round_trip_and_tamper_detection():
    contract = EmbeddingContract("mobilefacenet", "0.1", 512, extra={"trained_on": "pool"})
    again = EmbeddingContract.from_json(contract.to_json())
    assert again == contract and again.extra == contract.extra
    tampered = contract.to_json().replace('"embedding_size": 512', '"embedding_size": 128')
    with pytest.raises(ContractMismatchError, match="edited or corrupted"):
        EmbeddingContract.from_json(tampered)


def test_mismatch_is_refused_with_a_clear_message():
    require_same_contract("abc", "abc", "gallery")
    with pytest.raises(ContractMismatchError, match="gallery was made for embedding contract"):
        require_same_contract("abc", "def", "gallery")


# ---------------------------------------------------------------- alignment from the training config
def _checkpoint(run, config: dict | None, in_step: bool = True):
    """A run folder as training/trainer.py writes it (a tiny MobileFaceNet), with ``config`` as the
    resolved config.yaml beside model.pt (``in_step``) or only in the run folder."""
    import torch
    import yaml

    from facerec.models import create_model

    step = run / "checkpoints" / "step_00000003"
    step.mkdir(parents=True)
    model = create_model("mobilefacenet", width=0.25, embedding_size=32)
    torch.save({"model": model.state_dict(), "model_name": "mobilefacenet",
                "model_kwargs": {"width": 0.25, "embedding_size": 32}, "step": 3}, step / "model.pt")
    if config is not None:
        (step if in_step else run).joinpath("config.yaml").write_text(yaml.safe_dump(config))
    return step


def test_a_model_trained_on_centre_crops_does_not_claim_the_arcface_template(tmp_path):
    from facerec.contract import ARCFACE_TEMPLATE_112
    from facerec.export.torch_artifact import default_contract, load_torch_artifact, resolve_model, save_torch_artifact

    cropped = resolve_model(_checkpoint(tmp_path / "a", {"data": {"kind": "folder", "center_crop": 150}}))
    contract = default_contract(cropped)
    assert contract.alignment == "center-crop-150" != ARCFACE_TEMPLATE_112
    # the run folder's config.yaml counts when the step folder has none
    assert resolve_model(_checkpoint(tmp_path / "b", {"data": {"center_crop": 150}}, in_step=False)).alignment \
        == "center-crop-150"
    aligned = resolve_model(_checkpoint(tmp_path / "c", {"data": {"kind": "folder", "center_crop": None}}))
    assert default_contract(aligned).alignment == ARCFACE_TEMPLATE_112
    assert default_contract(aligned).contract_id != contract.contract_id
    assert resolve_model(_checkpoint(tmp_path / "d", None)).alignment == ARCFACE_TEMPLATE_112  # no config: as before
    # a torch artefact keeps the alignment it was exported with, so a re-export says the same
    path = save_torch_artifact(cropped, tmp_path / "m.pt", contract, ["embedding"])
    assert load_torch_artifact(path).contract.alignment == "center-crop-150"
    assert resolve_model(path).alignment == "center-crop-150"


def test_the_quick_start_config_means_centre_crops():
    """The README's quick-start model (training/configs/tiny_cpu.yaml, unaligned LFW deep-funneled
    images) is trained on centre crops, so its export must say so."""
    from pathlib import Path

    import yaml

    from facerec.contract import training_alignment

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "training/configs/tiny_cpu.yaml").read_text())
    assert training_alignment(config) == f"center-crop-{config['data']['center_crop']}"
    assert training_alignment({"data": {"kind": "synthetic"}}) == training_alignment(None) == "arcface-5pt-112-v1"


def test_the_face_pipeline_refuses_a_centre_crop_model():
    from facerec.runtime.pipeline import FacePipeline

    class Backend:
        contract = EmbeddingContract("mobilefacenet", "1", 32, alignment="center-crop-150")
        output_names = ["embedding"]

    with pytest.raises(ContractMismatchError, match="center-crop-150"):
        FacePipeline(Backend(), detector=None, batcher=None)
