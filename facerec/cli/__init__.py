"""The ``facerec`` command: one entry point, one module per sub-command.

Each sub-command module defines ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
imported only when their sub-command runs, so ``facerec --help`` stays fast and a sub-command's
heavy imports (torch, cv2) do not slow the others. A user's mistake is answered in one line with
exit code 2 (``facerec.cli.usage``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from facerec.cli.usage import OneLineParser, user_errors

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("facerec.cli.demo", "train a small model for a few steps on synthetic data"),
    "align": ("facerec.cli.align", "detect and align faces of a folder tree into 112x112 crops"),
    "export": ("facerec.cli.export",
               "export a checkpoint to parity-checked ONNX (fp32/fp16) and a torch artefact for serving"),
    "import": ("facerec.cli.import_model",
               "import an insightface-style ONNX recognition graph or an arcface_torch backbone.pth into a "
               "model folder that facerec serves"),
    "export-triton": ("facerec.cli.export_triton",
                      "write a Triton model repository (config.pbtxt, dynamic batching, versions) for a model"),
    "fit-ood": ("facerec.cli.fit_ood",
                "fit the OOD detector (Mahalanobis, prototypes) of an exported model and write ood.npz + a report"),
    "fit-quality": ("facerec.cli.fit_quality",
                    "choose the quality measure of a model without a quality head (embedding norm, "
                    "CR-FIQA-style head, detector score) on validation by EDC"),
    "calibrate": ("facerec.cli.calibrate",
                  "calibrate an exported model's threshold (at a FAR) and quality mapping on the validation split"),
    "eval": ("facerec.cli.eval",
             "evaluate a model (verify, quality, ood, openset) into a report folder: JSON, PNG plots, summary.md"),
    "calibrate-openset": ("facerec.cli.calibrate_openset",
                          "calibrate an exported model's open-set (1:N) thresholds at FPIRs on validation"),
    "teach": ("facerec.cli.teach",
              "compute a teacher's embeddings (dlib, ONNX, facerec model) of a dataset once, into a resumable cache"),
    "gallery": ("facerec.cli.gallery",
                "bulk-import persons into a gallery (embeddings file or photo tree) and build its search index"),
    "clean": ("facerec.cli.clean",
              "find wrong-person images of a dataset with a teacher's cached embeddings (a fixed rule); "
              "write the list data.exclude reads and a contact sheet"),
}


def build_parser(commands: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The ``facerec`` parser; the sub-commands in ``commands`` get their full arguments (their
    modules are imported), the others only their name and help."""
    import facerec

    parser = OneLineParser(
        prog="facerec",
        description="facerec: train, evaluate, export and serve face recognition models.",
    )
    parser.add_argument("--version", action="version", version=f"facerec {facerec.__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name in commands:
            importlib.import_module(module).add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The sub-command is the first bare word; only its module is imported, and it adds its own
    # arguments before parsing (so `facerec align --help` shows align's options).
    command = next((a for a in argv if not a.startswith("-")), None)
    known = command if command in COMMANDS else None
    parser = build_parser((known,) if known else ())
    args = parser.parse_args(argv)
    if known is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[known][0])
    with user_errors(f"facerec {known}"):
        return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
