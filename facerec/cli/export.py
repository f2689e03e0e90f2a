"""``facerec export``: a checkpoint -> parity-checked ONNX graphs (fp32, fp16) and a torch artefact."""

from __future__ import annotations

import argparse
import json

HELP = "export a checkpoint to parity-checked ONNX (fp32/fp16) and a torch artefact for serving"

EPILOG = """\
examples:
  facerec export runs/vit/checkpoints --out models/vit_tiny_fiqa          # best (or latest) step
  facerec export runs/vit/checkpoints/step_00020000 --out models/v2 --version 2.0
  facerec export --model mobilefacenet --random-init --out /tmp/mfn        # a smoke test, no weights
  facerec export --interop-only --out models/default    # add the insightface graph to a model folder

Writes <out>/<stem>.onnx, <stem>.fp16.onnx, <stem>.pt (torch artefact, loads with
weights_only=True), <stem>.insightface.onnx (the embedding alone: what insightface's
model_zoo.get_model loads as its recognition model), contract.json and export_report.json. Every graph is compared with torch on
export (cosine >= 0.9999 fp32, >= 0.999 fp16; fp16 also against autocast on the GPU if there is
one); a failed check exits non-zero and leaves no graph behind. The graph's input is 'input',
(N, 3, 112, 112) float32 RGB, (x - 127.5) / 127.5, as insightface's recognition models.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument(
        "checkpoint",
        nargs="?",
        help="a training checkpoint (step dir, model.pt, or a checkpoints folder: best.json, else "
        "the latest step) or a torch artefact",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--model", help="registry name (with --random-init, or to check the checkpoint)")
    parser.add_argument("--overrides", default="{}", help="JSON create_model overrides (with --random-init)")
    parser.add_argument("--random-init", action="store_true", help="export an untrained model (smoke tests)")
    parser.add_argument(
        "--version", help="model version in the contract (default: step<N> of the checkpoint)"
    )
    parser.add_argument("--stem", help="file name stem (default: the model name)")
    parser.add_argument("--no-fp16", action="store_true", help="skip the fp16 graph")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch artefact")
    parser.add_argument("--no-interop", action="store_true", help="skip the insightface graph")
    parser.add_argument("--interop-only", action="store_true",
                        help="only add <stem>.insightface.onnx to the export folder --out (from its fp32 graph)")
    parser.add_argument("--no-features", action="store_true", help="no feature_* outputs (no OOD scoring)")
    parser.add_argument("--opset", type=int, help="ONNX opset (default 18, or 17 with --legacy-exporter)")
    parser.add_argument("--legacy-exporter", action="store_true", help="TorchScript exporter (dynamo=False)")
    parser.add_argument("--keep-failed", action="store_true", help="keep a graph that failed parity, renamed")


def run(args) -> int:
    import torch

    from facerec.export import ParityError, export_bundle
    from facerec.export.torch_artifact import ModelSource, resolve_model
    from facerec.models import create_model

    if args.interop_only:
        return _interop_only(args)
    if args.random_init:
        if not args.model:
            raise SystemExit("facerec export: --random-init needs --model")
        try:
            overrides = json.loads(args.overrides)
        except json.JSONDecodeError as err:
            raise SystemExit(f"facerec export: --overrides is not JSON ({err}): {args.overrides}") from None
        if not isinstance(overrides, dict):
            raise SystemExit(f"facerec export: --overrides must be a JSON object, got {args.overrides}")
        torch.manual_seed(0)
        try:
            model = create_model(args.model, **overrides)
        except TypeError as err:  # an override the model does not take
            raise SystemExit(f"facerec export: --overrides {args.overrides}: {err}") from None
        source = ModelSource(model, args.model, overrides, "random-init")
    elif args.checkpoint:
        source = resolve_model(args.checkpoint)
        if args.model and args.model != source.name:
            raise SystemExit(f"facerec export: the checkpoint holds {source.name}, not {args.model}")
    else:
        raise SystemExit("facerec export: give a checkpoint, or --model NAME --random-init")
    if args.opset is not None and args.opset < 17:
        raise SystemExit("facerec export: opset 17 or newer")
    try:
        report = export_bundle(
            source,
            args.out,
            version=args.version,
            fp16=not args.no_fp16,
            torch_artifact=not args.no_torch,
            interop=not args.no_interop,
            stem=args.stem,
            return_features=not args.no_features,
            opset=args.opset,
            dynamo=not args.legacy_exporter,
            keep_failed=args.keep_failed,
        )
    except ParityError as err:
        print(err)
        return 1
    for graph in report["onnx"]:
        parity = graph["parity"]
        worst = min(c["value"] for c in parity["comparisons"] if c["output"] == "embedding")
        print(f"wrote {graph['path']} ({graph['precision']}; embedding cosine >= {worst:.6f})")
        for note in parity["notes"]:
            print(f"  note: {note}")
    if "insightface" in report:
        print(f"wrote {report['insightface']['path']} (insightface model zoo; embedding only)")
    if "torch_artifact" in report:
        print(f"wrote {report['torch_artifact']}")
    contract = report["contract"]
    print(f"contract {contract['contract_id']}: {report['model_name']} {contract['model_version']}")
    return 0


def _interop_only(args) -> int:
    from facerec.bundle import BundleError
    from facerec.export import ParityError, write_interop_graph

    if args.checkpoint or args.random_init:
        raise SystemExit("facerec export: --interop-only reads the folder --out; give no checkpoint")
    try:
        path, cosine = write_interop_graph(args.out)
    except (BundleError, ParityError) as err:
        raise SystemExit(f"facerec export: {err}") from None
    print(f"wrote {path} (insightface model zoo; embedding cosine vs the full graph >= {cosine:.6f})")
    return 0
