"""The insightface graph of a model folder: the embedding alone, as insightface's model zoo loads it.

insightface's ``model_zoo.get_model`` routes a graph by its shape: 5 or more outputs make it a face
detector (SCRFD), so the full graph (embedding, quality, OOD features) is never taken for a
recognition model. ``<stem>.insightface.onnx`` is the same computation cut down to its first output;
with one output, a square input of 112 (or any size >= 112 divisible by 16) it loads as
``ArcFaceONNX``. ``ArcFaceONNX`` reads the normalisation from the first 8 node names: a ``Sub`` and a
``Mul`` there mean "feed 0-255" (mxnet models), anything else (x - 127.5) / 127.5 on RGB (it swaps
OpenCV's BGR itself) - the latter is our contract, so such node names are renamed here.

The cut graph is compared with the full one on random faces before it is put in place (the
embedding must be the same to cosine >= 0.99999). It keeps the contract metadata (so it can be served
on its own too, without OOD or quality), but no calibration: that lives in the full graph only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from facerec import bundle
from facerec.export.parity import ParityError, normalise, random_faces, row_cosine

INTEROP_COSINE = 0.99999
# insightface's ArcFaceONNX: these node-name prefixes among the first 8 nodes mean "input is 0-255".
RAW_INPUT_MARKERS = ("Sub", "_minus", "Mul", "_mul")


def prune(graph, keep_output: str) -> None:
    """Keep only ``keep_output`` and what computes it (nodes, initializers, value infos)."""
    keep = [o for o in graph.output if o.name == keep_output]
    del graph.output[:]
    graph.output.extend(keep)
    needed = {keep_output}
    kept_nodes = []
    for node in reversed(graph.node):
        if needed & set(node.output):
            kept_nodes.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # names a subgraph (If / Loop) reads from the outer scope
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    needed.update(i for n in sub.node for i in n.input if i)
    kept_nodes.reverse()
    del graph.node[:]
    graph.node.extend(kept_nodes)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    infos = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _unmark_input(graph) -> None:
    for node in graph.node[:8]:
        if node.name.startswith(RAW_INPUT_MARKERS):
            node.name = "facerec_" + node.name


def _interop_metadata(meta: dict[str, str], source: Path) -> dict[str, str]:
    calibration = {bundle.METADATA_PREFIX + k for k in bundle.CALIBRATION_KEYS}
    out = {k: v for k, v in meta.items() if k not in calibration}
    out.update(bundle.prefixed({
        "output_names": json.dumps(["embedding"]),
        "feature_dims": "[]",
        "feature_kinds": "[]",
        "interop": f"insightface model_zoo graph cut from {source.name}",
    }))
    return out


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_interop(full: Path, interop: Path, batch_sizes: tuple[int, ...] = (1, 4)) -> float:
    """The smallest embedding cosine between the two graphs on random faces; raises ParityError."""
    a, b = _session(full), _session(interop)
    size = a.get_inputs()[0].shape[2]
    worst = 1.0
    for n in batch_sizes:
        x = normalise(random_faces(n, size=size, seed=100 + n))
        ea = a.run([a.get_outputs()[0].name], {a.get_inputs()[0].name: x})[0]
        eb = b.run(None, {b.get_inputs()[0].name: x})[0]
        worst = min(worst, row_cosine(np.asarray(ea), np.asarray(eb)))
    if not worst >= INTEROP_COSINE:
        raise ParityError(f"{interop}: embedding cosine {worst:.6f} < {INTEROP_COSINE} against {full}")
    return worst


def write_interop_graph(source: str | Path, out: str | Path | None = None) -> tuple[Path, float]:
    """Cut the fp32 graph of ``source`` (a model folder or a graph) to its embedding and write it as
    ``<stem>.insightface.onnx`` beside it (or at ``out``); returns (path, checked cosine)."""
    import onnx

    full = bundle.find_graph(source)
    model = onnx.load(str(full))
    first_output = model.graph.output[0].name
    if len(model.graph.input) != 1:
        raise ValueError(f"{full}: an insightface recognition graph has one input, this has {len(model.graph.input)}")
    prune(model.graph, first_output)
    _unmark_input(model.graph)
    meta = _interop_metadata({p.key: p.value for p in model.metadata_props}, full)
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    path = Path(out) if out is not None else full.with_name(bundle.interop_graph_name(full.name[: -len(".onnx")]))
    tmp = bundle.partial_path(path)
    onnx.save(model, str(tmp))
    try:
        worst = check_interop(full, tmp)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path, worst
