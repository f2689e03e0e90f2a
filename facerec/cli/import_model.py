"""``facerec import``: a recognition model made elsewhere -> a facerec model folder."""

from __future__ import annotations

import argparse

HELP = ("import an insightface-style ONNX recognition graph, an arcface_torch backbone.pth or dlib's ResNet "
        "(--dlib) into a model folder that facerec serves")

EPILOG = """\
examples:
  facerec import ~/.insightface/models/buffalo_l/w600k_r50.onnx --out models/w600k_r50
  facerec import my_bgr_model.onnx --out models/mine --bgr
  facerec import ms1mv3_arcface_r50/backbone.pth --arch r50 --out models/ms1mv3_r50
  facerec import wf42m_pfc03_vit_s/backbone.pth --arch vit_s --out models/wf42m_vit_s
  facerec import --dlib --out models/dlib_resnet
  facerec import --dlib --weights dlib_face_recognition_resnet_model_v1.dat --out models/dlib_resnet

The source takes one input (N, 3, S, S) and gives the embedding as its first output. How it is fed
is detected as insightface's ArcFaceONNX does: Sub and Mul nodes first mean the graph normalises
inside (fed 0-255), otherwise it is fed (x - 127.5) / 127.5; RGB unless --bgr. The folder holds the
graph wrapped to facerec's input convention (checked against the source), contract.json,
export_report.json and the insightface graph. It has no calibration until `facerec calibrate DIR`:
until then the service asks every verify request for its threshold.

A .pth source is an arcface_torch state dict (--arch as its --network: r18|r34|r50|r100 for its
IResNet, vit_t|vit_s|vit_b for its ViT): its layers are mapped onto facerec's iresnet / vit and the
model is exported as `facerec export` does (fp32 and fp16 graphs, torch artefact, insightface graph);
a key too many or too few is refused.

--dlib imports dlib's ResNet face descriptor (dlib_face_recognition_resnet_model_v1.dat by Davis
King, CC0), computed by facerec's torch port, without dlib: --weights, or face_recognition_models'
copy (pip install 'facerec[dlib]'). Its folder's contract says alignment dlib-chip-5pt-150-v1
(a 150x150 chip cut from the photo with facerec's MTCNN landmarks), input 150, embedding 128; the
service cuts that chip itself. Trees for calibrate / fit-quality / fit-ood's --aligned-pool must
be cut the same way: `facerec align ... --alignment dlib-chip-5pt-150-v1`. MODEL_CARD.md says the
licence. No insightface graph is written: insightface cuts ArcFace crops only.

An imported model has no quality head: `facerec fit-quality DIR ...` chooses its quality measure,
or --quality-from gives it a facerec model's quality token (ViT-FIQA): one graph runs both networks
on one input and gives `embedding` (the imported model's) and `quality` (the token). When the two
take different crops (dlib's chip, ArcFace's crop) the input is a canvas holding both
(dlib-chip-5pt-150-canvas-192-v1 for dlib + an ArcFace-aligned model): the recognizer reads an exact
window of it, the quality model a fixed resampling. --store-fp16 stores the weights as float16 (half
the file; computed in float32). The combined graph is checked against both parts before it is written.
--torch (dlib only) also writes the torch artefact of both networks, which the GPU serving backend and
`facerec fit-ood`'s attacks need; it is checked against the graph.

  facerec import --dlib --quality-from models/vit_fiqa --store-fp16 --out models/dlib_fiqa
  facerec import --dlib --quality-from models/vit_fiqa --torch --quality-weights ckpt/model.pt --out models/dlib_fiqa
  facerec import w600k_r50.onnx --quality-from models/vit_fiqa --out models/w600k_r50_fiqa
"""


QUALITY_CARD = """
## Quality (added by `facerec import --quality-from {quality_from}`)

The graph's `quality` output is the quality token of {name} {version} (contract {contract}), run on
its own crop ({alignment}, {size} px) taken from this model's input ({input}); the embedding is the
imported model's. Weights: {weights}. Calibrate the quality mapping with `facerec calibrate`.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    from facerec.export.arcface_torch import ARCHS

    parser.add_argument("source", nargs="?", help="an ONNX recognition graph (insightface model-zoo "
                                                  "conventions) or an arcface_torch backbone.pth")
    parser.add_argument("--dlib", action="store_true", help="import dlib's ResNet face descriptor (no source)")
    parser.add_argument("--weights", help="with --dlib: dlib_face_recognition_resnet_model_v1.dat "
                                          "(default: face_recognition_models' copy)")
    parser.add_argument("--arch", choices=sorted(ARCHS), help="the arcface_torch network of a .pth source")
    parser.add_argument("--out", required=True, help="the model folder to write")
    parser.add_argument("--bgr", action="store_true", help="the graph takes BGR input (nothing in a graph says so)")
    parser.add_argument("--name", help="model name and file stem (default: the source's file name)")
    parser.add_argument("--version", help="model version in the contract (default: imported-<source hash>[-bgr])")
    parser.add_argument("--quality-from", metavar="DIR",
                        help="a facerec model folder with a quality output: its token goes into the imported graph")
    parser.add_argument("--store-fp16", action="store_true",
                        help="with --quality-from: store the weights as float16 (computed in float32)")
    parser.add_argument("--torch", action="store_true",
                        help="with --dlib --quality-from: also write the torch artefact <stem>.pt (both networks; "
                             "the GPU torch backend and fit-ood's attacks use it)")
    parser.add_argument("--quality-weights", metavar="PATH",
                        help="with --torch: the quality model's torch weights (training checkpoint or artefact; "
                             "default: the --quality-from folder's one .pt)")


def run(args) -> int:
    if args.store_fp16 and not args.quality_from:
        raise SystemExit("facerec import: --store-fp16 is for --quality-from")
    if args.torch and not (args.dlib and args.quality_from):
        raise SystemExit("facerec import: --torch is for --dlib --quality-from (the torch port of dlib's network)")
    if args.quality_weights and not args.torch:
        raise SystemExit("facerec import: --quality-weights is for --torch")
    if args.quality_from:
        return _run_with_quality(args)
    return _run_import(args)


def _run_with_quality(args) -> int:
    """Import into a scratch folder, then write the recognizer + quality graph into --out."""
    import contextlib
    import io
    import tempfile
    from pathlib import Path

    from facerec.export.attach_quality import AttachQualityError, attach_quality
    from facerec.export.parity import ParityError

    quality_from = Path(args.quality_from)
    if not quality_from.is_dir():
        raise SystemExit(f"facerec import: --quality-from {quality_from}: no such model folder")
    out = args.out
    with tempfile.TemporaryDirectory(prefix="facerec-import-") as tmp:
        # The recognizer alone, under its own name and version: --name/--version are the combined model's.
        scratch = argparse.Namespace(**{**vars(args), "out": str(Path(tmp) / "recognizer"), "name": None,
                                        "version": None})
        with contextlib.redirect_stdout(io.StringIO()):  # the scratch folder's lines would mislead
            _run_import(scratch)
        try:
            report = attach_quality(scratch.out, quality_from, out, store_fp16=args.store_fp16, name=args.name,
                                    version=args.version)
        except (AttachQualityError, ParityError) as err:
            raise SystemExit(f"facerec import: {err}") from None
        torch_report = _write_torch(args, quality_from, out) if args.torch else None
        card = Path(scratch.out) / "MODEL_CARD.md"
        text = card.read_text() if card.is_file() else ""  # the recognizer's card (dlib: its licence)
        q = report["combined_from"]["quality"]
        Path(out, "MODEL_CARD.md").write_text(text + QUALITY_CARD.format(
            quality_from=quality_from, name=q["model_name"], version=q["model_version"], contract=q["contract_id"],
            alignment=q["alignment"], size=q["input_size"], input=report["contract"]["alignment"],
            weights=report["storage"]["weights"]))
    graph = report["onnx"][0]
    parts, parity = report["combined_from"], graph["parity"]
    print(f"wrote {graph['path']} ({graph['bytes'] / 1e6:.1f} MB, weights {report['storage']['weights']}): "
          f"embedding of {parts['recognizer']['model_name']} (cosine vs it alone >= {parity['embedding_min_cosine']:.6f}), "
          f"quality of {parts['quality']['model_name']} {parts['quality']['model_version']} "
          f"(max abs diff {parity['quality_max_abs_diff']:.2g})")
    if torch_report is not None:
        p = torch_report["parity"]
        print(f"wrote {torch_report['path']} ({torch_report['bytes'] / 1e6:.1f} MB, torch artefact; embedding cosine vs "
              f"the graph >= {p['embedding_min_cosine']:.6f}, quality max abs diff {p['quality_max_abs_diff']:.2g})")
    if parts["canvas"] is not None:
        print(f"input: the {parts['canvas']['size']} px canvas {parts['canvas']['id']}: align trees with "
              f"`facerec align ... --alignment {parts['canvas']['id']} --size {parts['canvas']['size']}`")
    return _written(report, out)


def _write_torch(args, quality_from, out) -> dict:
    """The combined folder's torch artefact: dlib's port and the quality model's torch weights."""
    from pathlib import Path

    from facerec.export.attach_quality import write_torch_artifact
    from facerec.export.parity import ParityError
    from facerec.export.torch_artifact import ModelSource, load_model_file
    from facerec.models import create_model
    from facerec.teachers.dlib_port import load_dlib_resnet

    found = sorted(Path(quality_from).glob("*.pt"))
    weights = args.quality_weights or (str(found[0]) if len(found) == 1 else None)
    if weights is None:
        raise SystemExit(f"facerec import: --torch needs the quality model's torch weights: {quality_from} has "
                         f"{len(found)} .pt files; give --quality-weights (a checkpoint, or `python -m "
                         "training.from_onnx` rebuilds one from its graph)")
    try:
        quality = load_model_file(weights)
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"facerec import: --quality-weights {weights}: {err}") from None
    recognizer = create_model("dlib_resnet_v1")
    dat = _dlib_weights(args)  # parsed again: the import above kept its graph, not the torch module
    recognizer.net = load_dlib_resnet(dat)
    source = ModelSource(recognizer, "dlib_resnet_v1", {}, "dlib", f"dlib:{dat.name}")
    try:
        return write_torch_artifact(out, source, quality)
    except ParityError as err:
        raise SystemExit(f"facerec import: {err} (are --quality-weights the weights of {quality_from}'s graph?)") \
            from None


def _run_import(args) -> int:
    from facerec.export.onnx_import import GraphImportError, import_onnx
    from facerec.export.parity import ParityError

    if args.dlib:
        return _run_dlib(args)
    if args.source is None:
        raise SystemExit("facerec import: give a source (.onnx or .pth) or --dlib")
    if args.weights:
        raise SystemExit("facerec import: --weights is for --dlib")
    if args.arch is not None or not args.source.endswith(".onnx"):
        return _run_state_dict(args)
    try:
        report = import_onnx(args.source, args.out, bgr=args.bgr, name=args.name, version=args.version)
    except (GraphImportError, ParityError) as err:
        raise SystemExit(f"facerec import: {err}") from None
    print(f"detected: {report['detected_text']}")
    graph = report["onnx"][0]
    print(f"wrote {graph['path']} (embedding cosine vs the source >= {graph['embedding_cosine_vs_source']:.6f})")
    return _written(report, args.out)


def _run_state_dict(args) -> int:
    from facerec.export.arcface_torch import StateDictImportError, import_arcface_torch
    from facerec.export.parity import ParityError

    if args.arch is None:
        raise SystemExit(f"facerec import: {args.source}: not an .onnx graph; an arcface_torch backbone.pth "
                         "needs --arch r18|r34|r50|r100|vit_t|vit_s|vit_b")
    if args.source.endswith(".onnx"):
        raise SystemExit("facerec import: --arch is for an arcface_torch .pth state dict, not an .onnx graph")
    if args.bgr:
        raise SystemExit("facerec import: --bgr is for an .onnx graph; arcface_torch models take RGB")
    try:
        report = import_arcface_torch(args.source, args.out, args.arch, name=args.name, version=args.version)
    except (StateDictImportError, ParityError) as err:
        raise SystemExit(f"facerec import: {err}") from None
    for graph in report["onnx"]:
        print(f"wrote {graph['path']} ({graph['precision']})")
    return _written(report, args.out, f" (arcface_torch {args.arch})")


def _run_dlib(args) -> int:
    import tempfile
    import warnings
    from pathlib import Path

    from facerec.export.dlib_import import import_dlib_graph
    from facerec.export.onnx_import import GraphImportError
    from facerec.export.parity import ParityError
    from facerec.teachers.dlib_port import DlibFormatError, export_dlib_onnx, load_dlib_resnet

    if args.source is not None or args.arch or args.bgr:
        raise SystemExit("facerec import: --dlib takes no source, --arch or --bgr (give the .dat as --weights)")
    weights = _dlib_weights(args)
    try:
        port = load_dlib_resnet(weights)
    except DlibFormatError as err:
        raise SystemExit(f"facerec import: {weights}: not dlib's face-recognition ResNet ({err})") from None
    with tempfile.TemporaryDirectory(prefix="facerec-dlib-") as tmp:
        with warnings.catch_warnings():  # the TorchScript exporter's notes on constant folding
            warnings.simplefilter("ignore", UserWarning)
            source = export_dlib_onnx(port, Path(tmp) / "dlib_port.onnx")
        try:
            report = import_dlib_graph(source, weights, args.out, name=args.name, version=args.version)
        except (GraphImportError, ParityError) as err:
            raise SystemExit(f"facerec import: {err}") from None
    graph = report["onnx"][0]
    print(f"wrote {graph['path']} (embedding cosine vs the port's graph >= {graph['embedding_cosine_vs_source']:.6f})")
    print(f"wrote {report['model_card']}")
    return _written(report, args.out, f" (dlib ResNet, alignment {report['contract']['alignment']})")


def _dlib_weights(args):
    """dlib's weights file: --weights, or face_recognition_models' copy; one line when missing."""
    from pathlib import Path

    from facerec.teachers.dlib_teacher import WEIGHTS, MissingExtraError, default_models_dir

    try:
        weights = Path(args.weights) if args.weights else default_models_dir() / WEIGHTS
    except MissingExtraError as err:
        raise SystemExit(f"facerec import: no --weights given and {err}") from None
    if not weights.is_file():
        raise SystemExit(f"facerec import: {weights}: no such dlib weights file")
    return weights


def _written(report: dict, out: str, origin: str = "") -> int:
    """The lines every import path ends with: the insightface graph, the contract, the next step."""
    if report["insightface"] is not None:
        print(f"wrote {report['insightface']['path']} (insightface model zoo)")
    contract = report["contract"]
    print(f"contract {contract['contract_id']}: {report['model_name']} {contract['model_version']}{origin}; "
          f"not calibrated: run `facerec calibrate {out} ...`")
    return 0
