"""``facerec export-triton``: add an exported embedding graph to a Triton model repository."""

from __future__ import annotations

import argparse
import json

HELP = "write a Triton model repository (config.pbtxt, dynamic batching, versioned folders) for a model"

EPILOG = """\
examples:
  facerec export-triton models/default --repository triton_repo            # -> facerec_vit_tiny_fiqa/1
  facerec export-triton models/v2 --repository triton_repo --name faces_v2 --kind gpu --instances 2
  tritonserver --model-repository triton_repo                              # then serve it

Writes <repository>/<name>/config.pbtxt (onnxruntime backend, max_batch_size, dynamic batching,
inputs and outputs read from the graph), <name>/<version>/model.onnx (the graph, unchanged) and
<name>/contract.json (+ manifest.json). A new version of the same model goes beside the old ones
(version = highest + 1); a different model (another contract id) under the same name is refused.
Triton takes aligned, normalised crops (see contract.json), not images: docs/deployment.md says
when to use it and when the facerec service.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("model", help="a `facerec export` folder, or one .onnx graph")
    parser.add_argument("--repository", required=True,
                        help="Triton model repository folder (made if missing)")
    parser.add_argument("--name", help="model name in the repository (default: facerec_<model name>)")
    parser.add_argument("--version", type=int, help="version folder (default: highest present + 1)")
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                        help="which graph of an export folder (default: %(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=32,
                        help="Triton max_batch_size (default: %(default)s)")
    parser.add_argument("--max-queue-delay-us", type=int, default=5000,
                        help="dynamic batching: longest wait to fill a batch, in microseconds "
                        "(default: %(default)s)")
    parser.add_argument("--preferred-batch-size", type=int, action="append",
                        help="dynamic batching preferred size (repeatable; default: none)")
    parser.add_argument("--kind", choices=["gpu", "cpu"], default="gpu",
                        help="instance kind (default: %(default)s)")
    parser.add_argument("--instances", type=int, default=1,
                        help="model instances per device (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace an existing version folder")


def run(args) -> int:
    from facerec.export.triton import export_triton

    try:
        result = export_triton(
            args.model, args.repository, name=args.name, version=args.version, precision=args.precision,
            max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
            preferred_batch_sizes=args.preferred_batch_size, kind=args.kind, instances=args.instances,
            force=args.force,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        raise SystemExit(f"facerec export-triton: {err}") from err
    print(json.dumps(result.to_dict(), indent=1))
    return 0
