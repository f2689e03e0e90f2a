"""How the command-line tools answer a user's mistake: one line on stderr, exit code 2, no traceback.

Shared by ``facerec``, ``facerec-train`` and ``facerec-serve``:

- :class:`OneLineParser` reports an argparse error as ``prog: error: ... (see 'prog --help')``
  instead of the usage block followed by the error;
- :func:`user_errors` turns the exceptions that mean "the input is wrong" into that one line:
  ``raise SystemExit("message")`` (the commands' own checks), a missing or unreadable file, an
  invalid pydantic model (a config), an unknown registry name, plus whatever types a caller adds
  for the scope it guards. Anything else is a bug and keeps its traceback.

The line is raised as :class:`CommandError`, a ``SystemExit`` with code 2 whose text is the message,
so an in-process caller (a test) can still match the message.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from facerec.registry import UnknownNameError

EXIT_USAGE = 2


class CommandError(SystemExit):
    """Exit code 2; ``str()`` is the one-line message (already printed to stderr)."""

    def __init__(self, message: str):
        super().__init__(EXIT_USAGE)
        self.message = message

    def __str__(self) -> str:
        return self.message


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def user_error_message(err: BaseException) -> str | None:
    """The one-line text of an exception that reports a user's mistake, else None (a bug)."""
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                        FileExistsError)):
        if err.filename is not None and err.strerror:
            return f"{err.strerror}: {err.filename}"
        return _flat(str(err))
    if isinstance(err, UnknownNameError):
        return _flat(str(err))
    pydantic = sys.modules.get("pydantic")  # not imported: the error cannot be one of its
    if pydantic is not None and isinstance(err, pydantic.ValidationError):
        problems = []
        for e in err.errors(include_input=False, include_url=False):
            where = ".".join(map(str, e["loc"]))
            text = e["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {text}" if where else text)
        return _flat(f"invalid {err.title}: " + "; ".join(problems))
    return None


def _flat(text: str) -> str:
    return " ".join(text.split())


@contextmanager
def user_errors(prog: str, *also: type[BaseException]) -> Iterator[None]:
    """Report a user's mistake raised inside the block as one line on stderr and exit code 2.

    ``also``: more exception types that, inside this block, can only mean a mistake in the input
    (e.g. ``ValueError`` while a config file is parsed)."""
    try:
        yield
    except CommandError:
        raise
    except SystemExit as exit_:
        if not isinstance(exit_.code, str):
            raise
        message = exit_.code if exit_.code.startswith(prog.split()[0]) else f"{prog}: {exit_.code}"
        _fail(message)
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a user's mistake
        message = user_error_message(err)
        if message is None and also and isinstance(err, also):
            message = _flat(str(err))
        if message is None:
            raise
        _fail(f"{prog}: {message}")


def _fail(message: str):
    print(message, file=sys.stderr)
    raise CommandError(message) from None
