"""``facerec import``: an ONNX recognition graph in insightface's conventions -> a facerec model folder.

The source graph takes one input (N, 3, S, S) and gives the embedding as its first output. Its input
convention is detected as insightface's ``ArcFaceONNX`` detects it, so the imported model computes
what insightface computes with the same file: a ``Sub`` and a ``Mul`` among the first 8 node names
(mxnet exports such as ``w600k_r50``'s ancestors) mean the graph normalises inside and is fed 0-255;
otherwise it is fed (x - 127.5) / 127.5. Colour order is RGB unless the user says ``bgr``: nothing in
a graph tells.

The imported graph is the source wrapped to facerec's convention, so everything downstream (the
runtime, the service, eval, calibrate) treats it like an export: input ``input`` (N, 3, S, S) float32,
RGB, (x - 127.5) / 127.5, a dynamic batch; a few nodes in front turn that into what the source expects
(x * 127.5 + 127.5 for a graph fed 0-255, a channel flip for BGR); the output is ``embedding``. The
wrapped graph is checked against the source on random faces (cosine >= 0.99999) before it is written.
Its contract's version carries the source file's hash (and ``-bgr``), so calibrations, OOD statistics
and galleries of two different source graphs, or of one graph fed two ways, never mix.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import facerec
from facerec import bundle
from facerec.contract import ARCFACE_TEMPLATE_112, EmbeddingContract
from facerec.export.interop import RAW_INPUT_MARKERS, prune, write_interop_graph
from facerec.export.onnx import INPUT_NAME, input_convention
from facerec.export.parity import ParityError, normalise, random_faces, row_cosine

IMPORT_COSINE = 0.99999
SOURCE_INPUT = "facerec_source_input"  # the source's input tensor, now computed from ours


class GraphImportError(ValueError):
    """The source is not a graph facerec can import (one clear line for the user)."""


@dataclass
class Detected:
    """What the source graph expects, as detected (and overridden by the user's ``bgr``)."""

    input_name: str
    input_size: int
    normalisation: str  # "inside" (feed 0-255) | "outside" (feed (x - 127.5) / 127.5)
    colour_order: str  # "RGB" | "BGR"
    embedding_output: str
    embedding_size: int
    outputs: int

    def describe(self) -> str:
        feed = "0-255 (the graph normalises inside: Sub/Mul nodes first)" if self.normalisation == "inside" \
            else "(x - 127.5) / 127.5 (no Sub/Mul nodes first)"
        extra = f"; {self.outputs - 1} more output(s) ignored" if self.outputs > 1 else ""
        return (f"input '{self.input_name}' {self.input_size}x{self.input_size} {self.colour_order}, fed {feed}; "
                f"embedding '{self.embedding_output}' of {self.embedding_size}{extra}")


def _normalises_inside(graph) -> bool:
    names = [n.name for n in graph.node[:8]]
    sub = any(n.startswith(RAW_INPUT_MARKERS[:2]) for n in names)
    mul = any(n.startswith(RAW_INPUT_MARKERS[2:]) for n in names)
    return sub and mul


def _session(model_or_path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    data = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def detect(model, bgr: bool = False) -> Detected:
    """The input convention of an insightface-style recognition graph (an ``onnx.ModelProto``)."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise GraphImportError(f"a recognition graph has one input, this one has {len(inputs)}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] != 3 or dims[2] is None or dims[2] != dims[3]:
        raise GraphImportError(f"input '{inputs[0].name}' must be (N, 3, S, S) with a fixed square S, got {dims}")
    size = int(dims[2])
    probe = _session(model).run([graph.output[0].name], {inputs[0].name: np.zeros((1, 3, size, size), np.float32)})[0]
    if probe.ndim != 2 or probe.shape[0] != 1:
        raise GraphImportError(f"the first output '{graph.output[0].name}' is not an (N, D) embedding: {probe.shape}")
    return Detected(inputs[0].name, size, "inside" if _normalises_inside(graph) else "outside",
                    "BGR" if bgr else "RGB", graph.output[0].name, int(probe.shape[1]), len(graph.output))


def _rename_input(graph, old: str, new: str) -> None:
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == old:
                node.input[k] = new


def wrap(model, found: Detected):
    """The source graph behind facerec's input convention, with one output ``embedding``."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    prune(graph, found.embedding_output)
    _rename_input(graph, found.input_name, SOURCE_INPUT)
    source_input = next(i for i in graph.input if i.name == found.input_name)
    graph.input.remove(source_input)
    size = found.input_size
    graph.input.insert(0, helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, size, size]))
    front, x = [], INPUT_NAME
    if found.colour_order == "BGR":
        graph.initializer.append(numpy_helper.from_array(np.array([2, 1, 0], np.int64), "facerec_bgr_order"))
        front.append(helper.make_node("Gather", [x, "facerec_bgr_order"], ["facerec_bgr"], axis=1,
                                      name="facerec_rgb_to_bgr"))
        x = "facerec_bgr"
    if found.normalisation == "inside":
        graph.initializer.append(numpy_helper.from_array(np.array(127.5, np.float32), "facerec_127_5"))
        front.append(helper.make_node("Mul", [x, "facerec_127_5"], ["facerec_scaled"], name="facerec_scale"))
        front.append(helper.make_node("Add", ["facerec_scaled", "facerec_127_5"], ["facerec_0_255"],
                                      name="facerec_to_0_255"))
        x = "facerec_0_255"
    front.append(helper.make_node("Identity", [x], [SOURCE_INPUT], name="facerec_source_feed"))
    if found.embedding_output != "embedding":  # a re-imported facerec graph already names it so
        graph.node.extend([helper.make_node("Identity", [found.embedding_output], ["embedding"],
                                            name="facerec_embedding")])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", found.embedding_size]))
    nodes = front + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def source_feed(faces_uint8: np.ndarray, found: Detected) -> np.ndarray:
    """What the source graph is fed for aligned RGB uint8 crops (insightface's ``get_feat`` input)."""
    x = faces_uint8[..., ::-1] if found.colour_order == "BGR" else faces_uint8
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
    return x if found.normalisation == "inside" else (x - 127.5) / 127.5


def check_import(source: Path, wrapped: Path, found: Detected) -> float:
    """Smallest embedding cosine of the wrapped graph vs the source on random faces (batches 1, 3)."""
    a, b = _session(source), _session(wrapped)
    worst = 1.0
    for n in (1, 3):
        faces = random_faces(n, size=found.input_size, seed=200 + n)
        ref = np.concatenate([a.run([found.embedding_output], {found.input_name: source_feed(f[None], found)})[0]
                              for f in faces])  # one at a time: the source may have a fixed batch of 1
        try:
            got = b.run(["embedding"], {INPUT_NAME: normalise(faces)})[0]
        except Exception as err:  # noqa: BLE001 - onnxruntime's own errors; said in one line
            raise GraphImportError(f"the graph does not run on a batch of {n} ({type(err).__name__}): "
                               "facerec needs a dynamic batch dimension") from None
        worst = min(worst, row_cosine(ref, got))
    if not worst >= IMPORT_COSINE:
        raise ParityError(f"imported graph differs from {source}: embedding cosine {worst:.6f} < {IMPORT_COSINE}")
    return worst


def import_onnx(src: str | Path, out_dir: str | Path, *, bgr: bool = False, name: str | None = None,
                version: str | None = None) -> dict:
    """Write the facerec model folder of the graph ``src`` into ``out_dir``; returns the report."""
    import onnx

    src = Path(src)
    if not src.is_file() or src.suffix != ".onnx":
        raise GraphImportError(f"{src}: not an .onnx file")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    model = onnx.load(str(src))
    found = detect(model, bgr)
    # The source's hash and how it is fed name the model: the same file read as BGR is another model.
    version = version or f"imported-{digest[:12]}" + ("-bgr" if found.colour_order == "BGR" else "")
    return write_imported(model, found, src, out_dir, name=name or src.stem, version=version,
                          origin=src.name, digest=digest, alignment=source_alignment(model, found))


def source_alignment(model, found: Detected) -> str:
    """The crop the source was made for: a facerec graph's own contract says it (its alignment, e.g.
    model 2.1's 192 px canvas); any other graph is taken as insightface's ArcFace template."""
    meta = {p.key: p.value for p in model.metadata_props}
    if bundle.METADATA_PREFIX + "contract" not in meta:
        return ARCFACE_TEMPLATE_112
    contract = bundle.contract_from_metadata(meta)
    if contract.input_size != found.input_size:
        raise GraphImportError(f"the graph's facerec contract says input {contract.input_size}, its input is "
                               f"{found.input_size}")
    return contract.alignment


def write_imported(model, found: Detected, src: Path, out_dir: str | Path, *, name: str, version: str,
                   origin: str, digest: str, alignment: str = ARCFACE_TEMPLATE_112,
                   extra: dict | None = None) -> dict:
    """The model folder of the source graph ``model`` (read from ``src``, fed as ``found`` says):
    the wrapped graph (checked against ``src``), contract.json, export_report.json and, for the
    ArcFace alignment, the insightface graph. ``origin``/``digest``: the file the model came from."""
    import onnx

    stem = name
    contract = EmbeddingContract(
        model_name=stem, model_version=version, embedding_size=found.embedding_size,
        input_size=found.input_size, alignment=alignment,
        extra={"imported_from": origin, "source_sha256": digest, "source_input": asdict(found), **(extra or {})},
    )
    wrapped = wrap(model, found)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / bundle.graph_name(stem)
    meta = bundle.prefixed({
        "contract": contract.to_json(), "contract_id": contract.contract_id, "model_name": stem,
        "model_version": contract.model_version, "model_overrides": "{}",
        "output_names": json.dumps(["embedding"]), "feature_dims": "[]", "feature_kinds": "[]",
        "input": json.dumps(input_convention(contract)), "precision": "fp32",
        "facerec_version": facerec.__version__, "exporter": "facerec import",
        "imported_from": json.dumps({"file": origin, "sha256": digest, "detected": asdict(found)}),
    })
    kept = [p for p in wrapped.metadata_props if not p.key.startswith(bundle.METADATA_PREFIX)]
    del wrapped.metadata_props[:]
    wrapped.metadata_props.extend(kept)  # a re-imported facerec graph: its old contract goes
    for key, value in meta.items():
        wrapped.metadata_props.add(key=key, value=value)
    tmp = bundle.partial_path(path)
    onnx.save(wrapped, str(tmp))
    try:
        cosine = check_import(src, tmp, found)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    # insightface cuts ArcFace crops only: another alignment's graph would be fed the wrong faces.
    interop = write_interop_graph(path)[0] if alignment == ARCFACE_TEMPLATE_112 else None
    report = {"model_name": stem, "origin": f"facerec import {origin}", "detected": asdict(found),
              "detected_text": found.describe(), "contract": json.loads(contract.to_json()),
              "onnx": [{"path": str(path), "precision": "fp32", "embedding_cosine_vs_source": round(cosine, 7)}],
              "insightface": None if interop is None else {"path": str(interop)}}
    (out / bundle.CONTRACT_FILE).write_text(contract.to_json() + "\n")
    (out / bundle.EXPORT_REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report
