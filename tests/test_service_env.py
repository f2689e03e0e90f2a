"""facerec-serve refuses FACEREC_* variables that nothing reads (a misspelt setting is otherwise
ignored without a word), and accepts every one the project does read."""

from __future__ import annotations

import re
from pathlib import Path

from service.settings import OTHER_VARIABLES, setting_variables, unknown_variables

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".tpl", ".json", ".txt", ".cfg", ".ini", ""}
SKIP_DIRS = {".git", ".venv", "runs", "__pycache__", "node_modules", ".pytest_cache"}


def repository_names() -> set[str]:
    """Every FACEREC_* name written anywhere in the repository's text files (code, tests, docs,
    deploy files); a name ending in '_' is a prefix in prose (FACEREC_METADATA_MAX_*), not a variable."""
    names: set[str] = set()
    for path in REPO.rglob("*"):
        if SKIP_DIRS & set(path.relative_to(REPO).parts) or not path.is_file():
            continue
        if path.suffix not in TEXT_SUFFIXES or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        names.update(n for n in re.findall(r"FACEREC_[A-Z0-9_]+", text) if not n.endswith("_"))
    return names


def test_every_facerec_variable_in_the_repository_is_accepted():
    names = repository_names()
    assert {"FACEREC_MODEL", "FACEREC_DATA", "FACEREC_PINS", "FACEREC_ACCURACY_REPORT"} <= names  # the scan works
    assert unknown_variables({name: "1" for name in names}) == []


def test_every_listed_variable_is_still_used():
    # a stale entry would let a misspelling of a retired name through
    assert set(OTHER_VARIABLES) - repository_names() == set()
    assert not set(OTHER_VARIABLES) & setting_variables()


def test_a_misspelt_setting_is_named_with_the_closest_setting():
    env = {"PATH": "/bin", "FACEREC_MODEL": "m", "FACEREC_" + "MODLE": "m", "FACEREC_" + "MAX_FACE": "3",
           "facerec_port": "80"}  # pydantic-settings reads names case-insensitively: so does the check
    found = unknown_variables(env)
    assert len(found) == 2
    assert "did you mean 'FACEREC_MODEL'" in found[1] and "did you mean 'FACEREC_MAX_FACES'" in found[0]


def test_start_stops_before_the_settings_are_read(monkeypatch, capsys):
    from service.__main__ import main

    monkeypatch.setenv("FACEREC_" + "DEVISE", "cpu")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'FACEREC_DEVICE'" in err
