"""A user's mistake gets one line on stderr and exit code 2, never a traceback: the real commands,
run as subprocesses from a folder outside the repository (so packaged files must be found through
the package, not the working directory). Also: `--version` and help text on every option."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_PERSON = REPO / "tests" / "data" / "lfw_sample" / "Adrien_Brody"

pytestmark = pytest.mark.timeout(300)


def run(args: list[str], cwd: Path, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEREC_") or k == "FACEREC_DATA"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env_extra)
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=240)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A working directory outside the repository, with one person's photos in it."""
    photos = tmp_path / "photos" / "person"
    photos.mkdir(parents=True)
    for image in sorted(SAMPLE_PERSON.glob("*.jpg"))[:2]:
        (photos / image.name).write_bytes(image.read_bytes())
    return tmp_path


TRAIN_MISTAKES = [
    (["--set", "loss.nope=1", "--print-config"], ["loss.nope", "not permitted"]),
    (["--set", "loss.margin=arcfase", "--print-config"], ["loss.margin", "unknown margin 'arcfase'",
                                                         "did you mean 'arcface'"]),
    (["--set", "loss.margin=arcfase"], ["did you mean 'arcface'"]),
    (["--set", "model.name=mobilefacenett"], ["model.name", "did you mean 'mobilefacenet'"]),
    (["--set", "optim.lr"], ["not key=value"]),
    ([], ["data.path tests/data/lfw_sample does not exist", "relative to the working directory"]),
]


@pytest.mark.parametrize(("extra", "fragments"), TRAIN_MISTAKES, ids=lambda v: " ".join(v) if v else "")
def test_training_mistakes_are_one_line(elsewhere, extra, fragments):
    proc = run(["training", "--config", "tiny_cpu", *extra], elsewhere)
    assert_one_line_error(proc, "facerec-train: ", *fragments)


def test_training_config_resolves_against_the_package_outside_the_repository(elsewhere):
    # a shipped config by name and by its repository path, from a folder where neither exists
    for name in ("tiny_cpu", "training/configs/tiny_cpu.yaml"):
        proc = run(["training", "--config", name, "--print-config"], elsewhere)
        assert proc.returncode == 0, proc.stderr
        assert "margin: arcface" in proc.stdout
    assert_one_line_error(run(["training", "--config", "tiny_cpuu"], elsewhere), "config 'tiny_cpuu' not found",
                          "tiny_cpu")
    assert_one_line_error(run(["training", "--bogus"], elsewhere), "unrecognized arguments: --bogus")


def test_facerec_mistakes_are_one_line(elsewhere):
    out = str(elsewhere / "out")
    assert_one_line_error(run(["facerec", "align", "no_such_folder", "--out", out], elsewhere),
                          "facerec align: ", "no_such_folder does not exist")
    # a detector that cannot be built fails before any pool worker starts (not one restart per worker)
    assert_one_line_error(run(["facerec", "align", "photos", "--out", out, "--detector", "mtcn",
                               "--workers", "2", "--no-progress"], elsewhere),
                          "facerec align: cannot build the detector", "'mtcn'")
    assert_one_line_error(run(["facerec", "export", "no_such_run", "--out", out], elsewhere),
                          "facerec export: ", "no_such_run")
    assert_one_line_error(run(["facerec", "export", "--model", "mobilefacenett", "--random-init", "--out", out],
                              elsewhere), "did you mean 'mobilefacenet'")
    assert_one_line_error(run(["facerec", "export", "--model", "mobilefacenet", "--random-init",
                               "--overrides", "{width", "--out", out], elsewhere), "--overrides is not JSON")
    assert_one_line_error(run(["facerec", "export", "--out", out, "--opset"], elsewhere),
                          "facerec export: error: argument --opset")
    assert_one_line_error(run(["facerec", "alignn"], elsewhere), "invalid choice: 'alignn'")
    assert not (elsewhere / "out").exists()


def test_serve_refuses_a_misspelt_variable(elsewhere):
    misspelt = "FACEREC_" + "MODLE"  # spelt in two parts: the repository scan must not find it
    proc = run(["service"], elsewhere, **{misspelt: "/models/x"})
    assert_one_line_error(proc, misspelt, "did you mean 'FACEREC_MODEL'")
    proc = run(["service"], elsewhere, FACEREC_MAX_FACES="1000")  # a known name, a value out of bounds
    assert_one_line_error(proc, "facerec-serve: invalid settings: max_faces")


@pytest.mark.parametrize("module", ["facerec", "training", "service"])
def test_version(module, elsewhere):
    import facerec

    proc = run([module, "--version"], elsewhere)
    assert proc.returncode == 0 and proc.stdout.strip().endswith(facerec.__version__), proc


def _options(parser: argparse.ArgumentParser) -> list[tuple[str, str | None]]:
    """(command and option, help) for every option and sub-command, sub-commands walked."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += [(f"{parser.prog} {a.dest}", a.help) for a in action._choices_actions]
            for sub in action.choices.values():
                found += _options(sub)
        else:
            found.append((f"{parser.prog} {'/'.join(action.option_strings) or action.dest}", action.help))
    return found


def test_every_option_of_every_command_has_help():
    from facerec.cli import COMMANDS, build_parser
    from service.__main__ import build_parser as serve_parser
    from training.__main__ import build_parser as train_parser

    options = [o for p in (build_parser(tuple(COMMANDS)), train_parser(), serve_parser()) for o in _options(p)]
    assert len(options) > 150  # the walk reaches the sub-commands' own options
    assert "facerec eval verify --fars" in dict(options)
    assert [name for name, text in options if not text or text == argparse.SUPPRESS] == []


def test_paths_of_an_unused_section_are_not_checked(tmp_path):
    """val.kind=none reads no validation files, synthetic data no data folder: their paths are not
    checked (the multi-node test runs from a temporary folder with val.kind=none); used ones are."""
    import training.__main__ as cli
    from training.config import Config

    cfg = Config.model_validate({"data": {"kind": "synthetic", "path": "nowhere"},
                                 "val": {"kind": "none", "path": "nowhere"}})
    cli.check_paths(cfg)  # nothing to refuse
    used = Config.model_validate({"data": {"kind": "folder", "path": str(tmp_path)},
                                  "val": {"kind": "lfw_fold", "path": "nowhere"}})
    with pytest.raises(SystemExit, match="val.path nowhere does not exist"):
        cli.check_paths(used)
