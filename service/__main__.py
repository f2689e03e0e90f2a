"""``facerec-serve``: start the REST service with the shipped model and no other argument.

Command-line options override the ``FACEREC_*`` environment (which overrides the defaults).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    import facerec
    from facerec.cli.usage import OneLineParser

    parser = OneLineParser(
        prog="facerec-serve",
        description="Serve face verification, quality and OOD scoring over HTTP. Settings come from "
        "FACEREC_* environment variables (docs/service.md); these options override them. An unknown "
        "FACEREC_* variable (a misspelt setting) stops the start.",
    )
    parser.add_argument("--version", action="version", version=f"facerec-serve {facerec.__version__}",
                        help="print the version and exit")
    parser.add_argument("--host", help="bind address (FACEREC_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (FACEREC_PORT, default 8000)")
    parser.add_argument("--model", help="model folder from `facerec export` (FACEREC_MODEL)")
    parser.add_argument("--device", help="auto | cuda | cuda:N | cpu (FACEREC_DEVICE)")
    parser.add_argument("--backend", choices=["auto", "onnxruntime", "torch"],
                        help="what runs the model (FACEREC_BACKEND, default auto)")
    parser.add_argument("--detector", choices=["mtcnn", "scrfd"],
                        help="face detector (FACEREC_DETECTOR, default mtcnn; scrfd needs "
                        "FACEREC_DETECTOR_MODEL, an insightface det_*.onnx)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log level of the service and uvicorn (default: info)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from pydantic import ValidationError

    from facerec.cli.usage import user_error_message
    from facerec.contract import ContractMismatchError
    from facerec.runtime import DeviceUnavailableError
    from service.detector import DetectorUnavailableError
    from service.settings import ModelNotFoundError, Settings, unknown_variables

    unknown = unknown_variables(os.environ)
    if unknown:
        print(f"facerec-serve: {'; '.join(unknown)}; correct or unset it (docs/service.md lists the "
              "settings)", file=sys.stderr)
        return 2

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in vars(args).items() if k != "log_level" and v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as err:
        # Without the input values: they can hold API keys or a database password.
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
                             for e in err.errors(include_input=False, include_url=False))
        print(f"facerec-serve: invalid settings: {problems}", file=sys.stderr)
        return 2

    import uvicorn

    from service.app import create_app
    from service.server import uvicorn_config

    try:
        app = create_app(settings)
    except (ModelNotFoundError, DeviceUnavailableError, ContractMismatchError, DetectorUnavailableError) as err:
        print(f"facerec-serve: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file the settings name (the OOD detector, the gallery) is missing
        message = user_error_message(err)
        if message is None:
            raise
        print(f"facerec-serve: {message}", file=sys.stderr)
        return 2
    # Deadlines, connection cap, header size and backlog from the settings (service/server.py).
    server = uvicorn.Server(uvicorn_config(app, settings, log_level=args.log_level))
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else 3  # 3: the port could not be bound (as uvicorn.run exits)


if __name__ == "__main__":
    raise SystemExit(main())
