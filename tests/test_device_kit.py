"""The device kit's pool packing: shards carried over several calls merge back into the whole pool."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from facerec.data.recordio import FaceRecReader

pytestmark = pytest.mark.timeout(60)
KIT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_kit"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"kit_{name}", KIT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_shards_merge_back_into_the_pool(tmp_path):
    prepare, merge = _load("prepare"), _load("merge_shards")
    rng = np.random.default_rng(0)
    pool = tmp_path / "pool"
    for i in range(7):  # identities with 1..3 images
        for j in range(1 + i % 3):
            (pool / f"id{i}").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(pool / f"id{i}" / f"{j}.jpg"), rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
    whole_n, whole_ids = prepare.pack_pool(pool, tmp_path / "whole", 75)
    shards = []
    for k in range(3):
        n, ids = prepare.pack_pool(pool, tmp_path / f"pool_{k}", 75, k, 3)
        assert ids == len(range(k, 7, 3))
        shards.append(tmp_path / f"pool_{k}")
    images, classes = merge.merge(shards, tmp_path / "merged")
    assert (images, classes) == (whole_n, whole_ids) == (13, 7)

    def groups(path):
        reader = FaceRecReader(path)
        by_label = {}
        for i in range(len(reader)):
            data, label = reader.read_raw(i)
            by_label.setdefault(label, []).append(data)
        return sorted(tuple(v) for v in by_label.values()), sorted(by_label)

    merged, labels = groups(tmp_path / "merged")
    assert labels == list(range(7))  # 0..C-1 without gaps
    assert merged == groups(tmp_path / "whole")[0]  # same images, grouped by the same identities
    assert (tmp_path / "merged" / "property").read_text().startswith("7,")
