"""One driver of the OOD study for its two callers, so both run exactly the same experiment:

- ``facerec fit-ood`` fits the shipped detector on the exported graph's features (onnxruntime);
- ``benchmarks/ood_eval.py`` compares detector variants on the torch model's features.

Both load the torch weights (attacks need gradients; ``fit-ood`` on an imported ONNX graph has none,
and its study has no attack families), open the same cached inputs
(:func:`open_study`, then :meth:`Study.build_inputs` with their own feature function), score a
detector's layers the same way (:func:`layer_scores`, :meth:`Study.split_scores`) and attack the
fitted detector the same way (:meth:`Study.adaptive_rows`). What each reports stays with it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from facerec.contract import EmbeddingContract
from facerec.eval.ood_study.families import ServiceLocator, to_input
from facerec.eval.ood_study.options import EvalConfig, config_of, floats
from facerec.eval.ood_study.scoring import (
    adaptive_row,
    adaptive_sets,
    det_scores_of,
    detection_layer,
)
from facerec.eval.ood_study.splits import (
    InputCache,
    SplitSpec,
    build_split,
    lfw_splits,
    log,
    pool_sample,
)
from facerec.export.torch_artifact import ModelSource, load_model_file

RunFn = Callable[[np.ndarray], tuple[list[np.ndarray], np.ndarray]]  # model input -> (features, embedding)


def load_attack_model(checkpoint: str, seed: int) -> ModelSource:
    """The torch weights, in eval mode with gradients off for the parameters (the attacks take
    gradients with respect to the input only)."""
    torch.manual_seed(seed)
    source = load_model_file(checkpoint)
    source.model.eval()
    for p in source.model.parameters():
        p.requires_grad_(False)
    return source


def onnx_runner(graph: Path) -> tuple[RunFn, list[str], dict]:
    """(run, layer output names, metadata) of an exported graph on onnxruntime's CPU provider. The
    layers are the ``feature_k`` outputs or, for a graph without any (an imported model), the
    embedding (:func:`facerec.bundle.ood_layer_outputs`)."""
    import onnxruntime as ort

    from facerec.bundle import ood_layer_outputs

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    names = ood_layer_outputs(o.name for o in session.get_outputs())  # the service's FeatureListScorer order
    wanted = list(dict.fromkeys([*names, "embedding"]))
    input_name = session.get_inputs()[0].name
    meta = dict(session.get_modelmeta().custom_metadata_map)

    def run(x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        out = dict(zip(wanted, session.run(wanted, {input_name: np.ascontiguousarray(x, dtype=np.float32)})))
        return [out[n] for n in names], out["embedding"]

    return run, names, meta


def torch_runner(model) -> RunFn:
    """The torch model's features and embedding, in float64."""

    def run(x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        with torch.no_grad():
            out = model(torch.from_numpy(x), return_features=True)
        return [f.double().numpy() for f in out.features], out.embedding.double().numpy()

    return run


def crop_features(run: RunFn, crops: np.ndarray, batch: int = 64) -> dict:
    """Features (``f0``..) and raw embeddings (``emb``) of uint8 crops; ``n`` = how many."""
    parts = [run(to_input(crops[i : i + batch]).numpy()) for i in range(0, len(crops), batch)]
    if not parts:
        return {"n": np.array(0)}
    out = {f"f{j}": np.concatenate([p[0][j] for p in parts]) for j in range(len(parts[0][0]))}
    out["emb"] = np.concatenate([p[1] for p in parts])
    out["n"] = np.array(len(crops))
    return out


def feature_list(f: dict) -> list[np.ndarray]:
    return [f[f"f{j}"] for j in range(sum(k[0] == "f" and k[1:].isdigit() for k in f))]


def layer_scores(det, f: dict, det_scores=None, use: list[int] | None = None) -> np.ndarray:
    """(N, columns) detector scores of one set's features and, for the detection layer, the face
    detector's confidence of each crop (``det_scores``); ``use``: only these columns."""
    if int(f["n"]) == 0:
        return np.zeros((0, det.n_columns if use is None else len(use)))
    scores = det.layer_scores(feature_list(f), det_scores).numpy()
    return scores if use is None else scores[:, use]


@dataclass
class Study:
    """One run's inputs: the config they depend on, the torch model that attacks, the service's
    face location, the cache, the two splits and the pool sample; then sets and features."""

    args: argparse.Namespace
    cfg: EvalConfig
    source: ModelSource | None
    locator: ServiceLocator
    cache: InputCache
    specs: dict[str, SplitSpec]
    pool: list[tuple[Path, str]]
    sets: dict[str, dict] = field(default_factory=dict)
    feats: dict[str, dict] = field(default_factory=dict)

    @property
    def model(self):
        """The torch model that attacks; None without torch weights (then the study has no attacks)."""
        return None if self.source is None else self.source.model

    def build_inputs(self, features: Callable[[np.ndarray], dict], key: str) -> None:
        """Every set of both splits, and its features by ``features`` (cached as ``<key>_<split>_<set>``)."""
        for split, spec in self.specs.items():
            log(f"{split}: inputs")
            self.sets[split] = build_split(split, spec, self.cfg, self.model, self.locator, self.cache)
            self.feats[split] = {
                n: self.cache.get(f"{key}_{split}_{n}", lambda s=s: features(s["crops"]))
                for n, s in self.sets[split].items()
            }

    def add_detection_layer(self, det) -> None:
        """The face detector's confidence as one more combiner column (unless switched off)."""
        if not self.args.no_detection_layer:
            det.detection = detection_layer(self.locator, self.sets["val"]["faces"])

    def split_scores(self, det, split: str, use: list[int] | None = None) -> dict[str, np.ndarray]:
        return {n: layer_scores(det, f, self.sets[split][n]["det_score"], use) for n, f in self.feats[split].items()}

    def test_embeddings(self) -> dict[str, np.ndarray]:
        return {n: f.get("emb", np.zeros((0, 1))) for n, f in self.feats["test"].items()}

    def adaptive_rows(self, det, s_in: np.ndarray, features: Callable[[np.ndarray], dict], tag: str,
                      verification_threshold: float, use: list[int] | None = None,
                      layer_auroc: bool = False) -> dict[str, dict]:
        """The adaptive PGD against the fitted ``det`` on the test faces (never used for fitting),
        one row per domain and weight; ``layer_auroc`` adds each column's AUROC against the faces."""
        from facerec.ood.metrics import auroc

        args, faces = self.args, self.sets["test"]["faces"]
        clean = self.test_embeddings()["faces"]
        attacked = adaptive_sets(self.model, det, self.locator, faces, clean, self.cache, self.cfg.domains,
                                 args.adaptive_eps, args.adaptive_steps, floats(args.adaptive_weights),
                                 args.seed + 7, tag, use)
        rows = {}
        for name, s in attacked.items():
            f = features(s["crops"])
            cols = layer_scores(det, f, det_scores_of(det, s), use)
            s_out = det.combine(cols) if len(s["crops"]) else np.zeros(0)
            row = adaptive_row(s_in, s_out, det.threshold, s, f.get("emb"), faces, clean, args.tpr,
                               verification_threshold)
            if layer_auroc and len(s["crops"]):
                ref = layer_scores(det, self.feats["test"]["faces"], faces["det_score"], use)
                row["layer_auroc"] = [auroc(ref[:, j], cols[:, j]) for j in range(cols.shape[1])]
            rows[name] = row
        return rows


def open_study(args: argparse.Namespace, source: ModelSource | None, contract: EmbeddingContract,
               feature_dims=None) -> Study:
    """The config, cache, splits and pool sample of the parsed options (nothing computed yet).
    ``source`` None: no torch weights, so no attacks (``--domains`` must be empty); ``feature_dims``
    (default: the torch model's) keys the cache."""
    cfg = config_of(args)
    if source is None and cfg.domains:
        raise ValueError("attacks need the torch weights: without them the study has no attack domains")
    dims = source.model.feature_dims if feature_dims is None else feature_dims
    cache = InputCache(args.cache, cfg.cache_key(dims))
    log(f"input cache {cache.dir}")
    rng = np.random.default_rng(args.seed)
    specs = lfw_splits(cfg, args.data, rng)
    pool = pool_sample(args.aligned_pool, args.pool_images, rng)
    return Study(args, cfg, source, ServiceLocator(contract), cache, specs, pool)
