"""The CI variant of benchmarks/schemathesis_run.py: the service of this checkout in its own process
(real uvicorn, the random-init test model, an API key), schemathesis with every check, authenticated,
for about 50 s. Zero 5xx answers, zero response-schema violations, no traceback in the server log.
The fuller run (docs/schemathesis.md) is ``python benchmarks/schemathesis_run.py``."""

from __future__ import annotations

import sys

import pytest

from service.testing import REPO_ROOT, shared_model_dir

pytest.importorskip("schemathesis")
pytestmark = pytest.mark.timeout(300)


def test_schemathesis_all_checks_no_5xx_no_schema_violation(tmp_path_factory):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import schemathesis_run

    model = shared_model_dir(tmp_path_factory)
    args = schemathesis_run.parse_args(["--max-examples", "5", "--max-time", "50", "--seed", "16",
                                        "--model", str(model), "--no-write"])
    result = schemathesis_run.run(args)
    # It really ran: every documented operation, hundreds of answers, the service survived it.
    assert result["operations_tested"] >= 20, result["operations_tested"]
    assert result["responses"] >= 300, result["responses"]
    assert result["service_alive_after_run"]
    examples = {k: v for k, v in result["failure_examples"].items()
                if k.split(" | ")[0] in ("not_a_server_error", "response_schema_conformance")}
    assert result["responses_5xx"] == 0, (result["responses_5xx_by_operation"], examples)
    assert result["schema_violations"] == 0, examples
    assert result["server_tracebacks"] == 0
