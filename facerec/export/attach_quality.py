"""Give a recognizer another model's quality token: one ONNX graph running both networks.

A model made elsewhere (``facerec import``: an insightface graph, dlib's ResNet) has no quality output;
a facerec ViT-FIQA model has one (its learnable quality token, trained to predict each face's
utility). ``facerec import ... --quality-from DIR`` writes a model folder whose single graph takes one
aligned crop and gives the recognizer's ``embedding`` and the quality model's ``quality``, so the
service, ``facerec calibrate``, ``eval`` and the benchmarks read the token as they read any model's.

The two networks may be trained on different crops. When their alignments differ (dlib's 150 px chip,
ArcFace's 112 px crop), the graph's input is a **canvas** registered in
:data:`facerec.data.align.CANVASES` that holds both: the recognizer's crop is an exact window of it (a
``Slice``: the recognizer sees the pixels it would see alone) and the quality crop a fixed bilinear
``GridSample`` through the similarity between the two templates. When they are the same, both
networks read the input as it is.

``store_fp16``: weights are stored as float16 and cast back to float32 when a session loads the graph
(onnxruntime folds the casts into constants), so the file is half the size and the arithmetic stays
float32; the parity check bounds what the rounding of the weights costs.

Before the folder is written the graph is checked against its parts on faces: the embedding against
the recognizer's graph fed the window, the quality against the quality graph fed a crop resampled in
numpy (:func:`bilinear_crop`, the re-derivation of the ``GridSample``).

:func:`write_torch_artifact` adds the torch twin (``<stem>.pt``, the registry's ``canvas_pair`` with
both networks' weights) when both parts have torch weights (dlib's port; the quality model's
checkpoint): the GPU serving backend and ``facerec fit-ood``'s attacks (gradients) need it. It is
checked against the folder's graph before it is kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

import facerec
from facerec import bundle
from facerec.contract import EmbeddingContract
from facerec.data.align import Canvas, find_canvas
from facerec.export.onnx import INPUT_NAME, input_convention
from facerec.export.onnx_import import _session
from facerec.export.parity import normalise, random_faces, row_cosine

EMBEDDING_COSINE = 0.9999  # combined graph vs the recognizer alone (fp16-stored weights included)
QUALITY_ABS = {"fp32": 1e-4, "fp16": 5e-3}  # combined quality vs the quality graph on the same crop
FP16_MIN_ELEMENTS = 1024  # smaller tensors (biases, norms) stay float32: they weigh nothing
REC, QUAL = "rec/", "qual/"


class AttachQualityError(ValueError):
    """The two model folders cannot be combined (one clear line for the user)."""


def bilinear_crop(canvas: np.ndarray, canvas_layout: Canvas) -> np.ndarray:
    """The secondary crop of normalised canvases (N, 3, C, C): bilinear sampling at
    :meth:`Canvas.secondary_pixels`, zeros outside: what the graph's ``GridSample`` computes."""
    x, y = canvas_layout.secondary_pixels()
    s, c = canvas_layout.secondary_size, canvas_layout.size
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    out = np.zeros(canvas.shape[:2] + (s, s), np.float64)
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi < c) & (yi >= 0) & (yi < c)
        vals = canvas[:, :, np.clip(yi, 0, c - 1), np.clip(xi, 0, c - 1)]
        out += np.where(inside, w, 0.0) * vals
    return out.astype(np.float32)


def _graph(folder: Path, role: str):
    model = bundle.ModelBundle(folder)
    try:
        return model, model.graph("fp32")
    except bundle.BundleError as err:
        raise AttachQualityError(f"the {role} {folder}: {err}") from None


def _outputs(path: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


def layout(recognizer: EmbeddingContract, quality: EmbeddingContract) -> Canvas | None:
    """The canvas both crops are cut from, or None when the two models take the same crop."""
    for c, role in ((recognizer, "recognizer"), (quality, "quality model")):
        if (tuple(c.mean), tuple(c.std), c.colour_order) != ((127.5,) * 3, (127.5,) * 3, "RGB"):
            raise AttachQualityError(f"the {role} is not fed facerec's (x - 127.5) / 127.5 RGB "
                                     f"(mean {c.mean}, std {c.std}, {c.colour_order})")
    if (recognizer.alignment, recognizer.input_size) == (quality.alignment, quality.input_size):
        return None
    canvas = find_canvas(recognizer.alignment, quality.alignment)
    if canvas is None or (canvas.primary_size, canvas.secondary_size) != (recognizer.input_size, quality.input_size):
        from facerec.data.align import CANVASES

        known = ", ".join(f"{c.primary} {c.primary_size} + {c.secondary} {c.secondary_size}" for c in CANVASES.values())
        raise AttachQualityError(
            f"no canvas holds both crops: recognizer {recognizer.alignment} {recognizer.input_size} px, "
            f"quality model {quality.alignment} {quality.input_size} px (registered: {known})")
    return canvas


def _common_opset(*models) -> int:
    from onnx import version_converter

    versions = [next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) for m in models]
    target = max(versions + [16])  # GridSample is opset 16
    for k, m in enumerate(models):
        if versions[k] != target:
            converted = version_converter.convert_version(m, target)
            m.CopyFrom(converted)
    return target


def _store_fp16(graph) -> dict:
    """float32 initializers of >= FP16_MIN_ELEMENTS values -> float16 + a Cast back (fp32 compute)."""
    from onnx import TensorProto, helper, numpy_helper

    casts, kept, stored = [], [], 0
    for t in list(graph.initializer):
        a = numpy_helper.to_array(t)
        if t.data_type != TensorProto.FLOAT or a.size < FP16_MIN_ELEMENTS or not np.all(np.abs(a) < 60000):
            kept.append(t)
            continue
        kept.append(numpy_helper.from_array(a.astype(np.float16), t.name + "_fp16"))
        casts.append(helper.make_node("Cast", [t.name + "_fp16"], [t.name], to=TensorProto.FLOAT,
                                      name=f"facerec_fp16_to_fp32/{t.name}"))
        stored += 1
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return {"fp16_tensors": stored, "fp32_tensors": len(kept) - stored}


def combine(rec_graph: Path, qual_graph: Path, canvas: Canvas | None, input_size: int, embedding_size: int,
            rec_outputs: list[str], store_fp16: bool = False):
    """The combined ``onnx.ModelProto`` (no metadata yet) and what the weight storage did."""
    import onnx
    from onnx import TensorProto, compose, helper, numpy_helper
    from onnx.utils import Extractor

    rec = onnx.load(str(rec_graph))
    qual = Extractor(onnx.load(str(qual_graph))).extract_model([INPUT_NAME], ["quality"])
    opset = _common_opset(rec, qual)
    rec, qual = compose.add_prefix(rec, REC), compose.add_prefix(qual, QUAL)
    front, inits = [], []
    if canvas is None:
        front.append(helper.make_node("Identity", [INPUT_NAME], [REC + INPUT_NAME], name="facerec_rec_feed"))
        front.append(helper.make_node("Identity", [INPUT_NAME], [QUAL + INPUT_NAME], name="facerec_qual_feed"))
    else:
        (ox, oy), s = canvas.offset, canvas.primary_size
        inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (
            ("facerec_window_starts", [oy, ox]), ("facerec_window_ends", [oy + s, ox + s]),
            ("facerec_window_axes", [2, 3]), ("facerec_zero", [0]),
            ("facerec_grid_tail", [canvas.secondary_size, canvas.secondary_size, 2]))]
        inits.append(numpy_helper.from_array(canvas.secondary_grid()[None], "facerec_grid"))
        front += [
            helper.make_node("Slice", [INPUT_NAME, "facerec_window_starts", "facerec_window_ends", "facerec_window_axes"],
                             [REC + INPUT_NAME], name="facerec_recognizer_window"),
            helper.make_node("Shape", [INPUT_NAME], ["facerec_input_shape"], name="facerec_input_shape"),
            helper.make_node("Gather", ["facerec_input_shape", "facerec_zero"], ["facerec_batch"], axis=0,
                             name="facerec_batch"),
            helper.make_node("Concat", ["facerec_batch", "facerec_grid_tail"], ["facerec_grid_shape"], axis=0,
                             name="facerec_grid_shape"),
            helper.make_node("Expand", ["facerec_grid", "facerec_grid_shape"], ["facerec_grid_batch"],
                             name="facerec_grid_batch"),
            helper.make_node("GridSample", [INPUT_NAME, "facerec_grid_batch"], [QUAL + INPUT_NAME],
                             mode="bilinear", padding_mode="zeros", align_corners=0, name="facerec_quality_crop"),
        ]
    back = [helper.make_node("Identity", [REC + n], [n], name=f"facerec_out_{n}") for n in rec_outputs]
    back.append(helper.make_node("Identity", [QUAL + "quality"], ["quality"], name="facerec_out_quality"))
    rec_shapes = {o.name[len(REC):]: o for o in rec.graph.output}
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", embedding_size])]
    for n in rec_outputs[1:]:
        dims = [d.dim_value or d.dim_param for d in rec_shapes[n].type.tensor_type.shape.dim]
        outputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch"] + dims[1:]))
    outputs.append(helper.make_tensor_value_info("quality", TensorProto.FLOAT, ["batch"]))
    graph = helper.make_graph(
        front + list(rec.graph.node) + list(qual.graph.node) + back, "facerec_recognizer_with_quality",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, input_size, input_size])],
        outputs, initializer=inits + list(rec.graph.initializer) + list(qual.graph.initializer))
    storage = {"weights": "fp32"}
    if store_fp16:
        storage = {"weights": "fp16, cast to fp32 when loaded", **_store_fp16(graph)}
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=max(rec.ir_version, qual.ir_version))
    onnx.checker.check_model(model)
    return model, storage


def _parity(outputs, precision: str, what: str, **facts) -> dict:
    """The report of (reference embedding, embedding, reference quality, quality) batches: worst
    embedding cosine and quality difference against the limits of ``precision``; ParityError beyond."""
    from facerec.export.parity import ParityError

    worst_cos, worst_q = 1.0, 0.0
    for ref_emb, emb, ref_q, q in outputs:
        worst_cos = min(worst_cos, row_cosine(ref_emb, emb))
        worst_q = max(worst_q, float(np.max(np.abs(np.reshape(ref_q, -1) - np.reshape(q, -1)))))
    report = {"embedding_min_cosine": round(worst_cos, 8), "embedding_limit": EMBEDDING_COSINE,
              "quality_max_abs_diff": float(f"{worst_q:.3g}"), "quality_limit": QUALITY_ABS[precision], **facts}
    if not (worst_cos >= EMBEDDING_COSINE and worst_q <= QUALITY_ABS[precision]):
        raise ParityError(f"{what}: {report}")
    return report


def check_combined(combined: Path, rec_graph: Path, qual_graph: Path, canvas: Canvas | None, input_size: int,
                   precision: str, faces: np.ndarray | None = None) -> dict:
    """The combined graph against its two parts on ``faces`` (uint8 crops of the combined input;
    default: random faces at batch 1 and 3). Raises ParityError beyond the limits."""
    both, rec, qual = _session(combined), _session(rec_graph), _session(qual_graph)
    batches = [faces] if faces is not None else [random_faces(n, size=input_size, seed=300 + n) for n in (1, 3)]
    outputs = []
    for batch in batches:
        x = normalise(batch)
        emb, quality = both.run(["embedding", "quality"], {INPUT_NAME: x})
        if canvas is None:
            rec_in, qual_in = x, x
        else:
            (ox, oy), s = canvas.offset, canvas.primary_size
            rec_in, qual_in = np.ascontiguousarray(x[:, :, oy:oy + s, ox:ox + s]), bilinear_crop(x, canvas)
        outputs.append((rec.run(["embedding"], {INPUT_NAME: rec_in})[0], emb,
                        qual.run(["quality"], {INPUT_NAME: qual_in})[0], quality))
    return _parity(outputs, precision, "the combined graph differs from its parts",
                   faces=int(sum(len(b) for b in batches)))


def attach_quality(recognizer_dir: str | Path, quality_dir: str | Path, out_dir: str | Path, *,
                   store_fp16: bool = False, name: str | None = None, version: str | None = None) -> dict:
    """Write the model folder of the recognizer in ``recognizer_dir`` with the ``quality`` output of
    the model in ``quality_dir`` into ``out_dir``; returns the report (also export_report.json)."""
    import onnx

    rec_bundle, rec_graph = _graph(Path(recognizer_dir), "recognizer")
    qual_bundle, qual_graph = _graph(Path(quality_dir), "quality model")
    rec_c, qual_c = rec_bundle.contract(), qual_bundle.contract()
    rec_outs, qual_outs = _outputs(rec_graph), _outputs(qual_graph)
    if "quality" in rec_outs:
        raise AttachQualityError(f"the recognizer {recognizer_dir} has its own quality output")
    if "quality" not in qual_outs:
        raise AttachQualityError(f"the quality model {quality_dir} has no quality output (outputs: {qual_outs})")
    if "embedding" not in rec_outs:
        raise AttachQualityError(f"the recognizer {recognizer_dir} has no embedding output (outputs: {rec_outs})")
    canvas = layout(rec_c, qual_c)
    input_size = rec_c.input_size if canvas is None else canvas.size
    rec_outputs = ["embedding"] + [n for n in rec_outs if n.startswith("feature_")]
    model, storage = combine(rec_graph, qual_graph, canvas, input_size, rec_c.embedding_size, rec_outputs, store_fp16)

    name = name or rec_c.model_name
    parts = {
        "recognizer": {"model_name": rec_c.model_name, "model_version": rec_c.model_version,
                       "contract_id": rec_c.contract_id, "alignment": rec_c.alignment, "input_size": rec_c.input_size,
                       **({"licence": rec_c.extra["licence"]} if "licence" in rec_c.extra else {})},
        "quality": {"model_name": qual_c.model_name, "model_version": qual_c.model_version,
                    "contract_id": qual_c.contract_id, "alignment": qual_c.alignment, "input_size": qual_c.input_size},
        "canvas": None if canvas is None else {"id": canvas.id, "size": canvas.size, "window_offset": list(canvas.offset)},
        "weights": storage["weights"],
    }
    contract = EmbeddingContract(
        model_name=name, model_version=version or f"{rec_c.model_version}+q-{qual_c.contract_id[:8]}",
        embedding_size=rec_c.embedding_size, input_size=input_size,
        alignment=rec_c.alignment if canvas is None else canvas.id, extra={"combined_from": parts})
    rec_meta = rec_bundle.metadata()
    meta = bundle.prefixed({
        "contract": contract.to_json(), "contract_id": contract.contract_id, "model_name": name,
        "model_version": contract.model_version, "model_overrides": "{}",
        "output_names": json.dumps(rec_outputs + ["quality"]),
        "feature_dims": rec_meta.get(bundle.METADATA_PREFIX + "feature_dims", "[]"),
        "feature_kinds": rec_meta.get(bundle.METADATA_PREFIX + "feature_kinds", "[]"),
        "input": json.dumps(input_convention(contract)), "precision": "fp32",
        "weights_storage": storage["weights"], "facerec_version": facerec.__version__,
        "exporter": "facerec import --quality-from", "combined_from": json.dumps(parts),
    })
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / bundle.graph_name(name)
    tmp = bundle.partial_path(path)
    onnx.save(model, str(tmp))
    try:
        parity = check_combined(tmp, rec_graph, qual_graph, canvas, input_size, "fp16" if store_fp16 else "fp32")
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    report = {"model_name": name, "origin": f"facerec import --quality-from {quality_dir} ({recognizer_dir})",
              "contract": json.loads(contract.to_json()), "combined_from": parts, "storage": storage,
              "onnx": [{"path": str(path), "precision": "fp32", "bytes": path.stat().st_size, "parity": parity}],
              "insightface": None}
    (out / bundle.CONTRACT_FILE).write_text(contract.to_json() + "\n")
    (out / bundle.EXPORT_REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report


def write_torch_artifact(out_dir: str | Path, recognizer, quality) -> dict:
    """Write ``<stem>.pt`` into the combined folder ``out_dir`` from the torch weights of its two parts
    (``facerec.export.torch_artifact.ModelSource`` each: registry name, overrides, module), check it
    against the folder's graph on random canvases and record it in export_report.json."""
    import torch

    from facerec.export.torch_artifact import ModelSource, load_torch_artifact, save_torch_artifact
    from facerec.models import create_model

    out = Path(out_dir)
    model_dir = bundle.ModelBundle(out)
    contract = model_dir.contract()
    report = json.loads((out / bundle.EXPORT_REPORT_FILE).read_text())
    canvas = (report["combined_from"].get("canvas") or {}).get("id")
    overrides = {"recognizer": recognizer.name, "recognizer_overrides": dict(recognizer.overrides),
                 "quality": quality.name, "quality_overrides": dict(quality.overrides), "canvas": canvas}
    model = create_model("canvas_pair", **overrides).eval()
    model.recognizer.load_state_dict(recognizer.model.state_dict())
    model.quality_model.load_state_dict(quality.model.state_dict())
    graph = model_dir.graph()
    path = out / bundle.torch_artifact_name(graph.stem)
    tmp = path.with_name(path.stem + ".partial.pt")
    source = ModelSource(model, "canvas_pair", overrides, contract.model_version,
                         f"{recognizer.origin} + {quality.origin}", alignment=contract.alignment)
    save_torch_artifact(source, tmp, contract, _outputs(graph))
    precision = "fp32" if report["storage"]["weights"] == "fp32" else "fp16"  # the graph's, not the artefact's
    try:
        reloaded = load_torch_artifact(tmp).model
        session = _session(graph)
        outputs = []
        for n in (1, 3):
            x = normalise(random_faces(n, size=contract.input_size, seed=400 + n))
            emb, q = session.run(["embedding", "quality"], {INPUT_NAME: x})
            with torch.no_grad():
                got = reloaded(torch.from_numpy(x))
            outputs.append((emb, got.embedding.numpy(), q, got.quality.numpy()))
        parity = _parity(outputs, precision, f"the torch artefact differs from {graph.name}", against=graph.name)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    report["torch"] = {"path": str(path), "bytes": path.stat().st_size, "model_name": "canvas_pair",
                       "overrides": overrides, "parity": parity}
    (out / bundle.EXPORT_REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report["torch"]
