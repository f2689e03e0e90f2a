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
