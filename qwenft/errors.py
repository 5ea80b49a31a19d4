"""Domain errors. The CLI turns them into a one-line message, a hint and an exit code."""

from __future__ import annotations


class QwenftError(Exception):
    """Bad usage or bad input: nothing was started or written. Exit code 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


def raise_all(problems: list[QwenftError]) -> None:
    """Report every problem at once: nothing if there is none, the one problem as it is, else one
    QwenftError listing each problem with its hint."""
    if not problems:
        return
    if len(problems) == 1:
        raise problems[0]
    lines = [f"{len(problems)} problems; nothing was started or written:"]
    for p in problems:
        lines.append(f"  - {p.message}" + (f" (hint: {p.hint})" if p.hint else ""))
    raise QwenftError("\n".join(lines))


class JobFailed(QwenftError):
    """A launched job (training, export, ...) failed. Exit code 1; names the log to read."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, returncode: int = 1) -> None:
        super().__init__(message, hint)
        self.returncode = returncode


class Interrupted(QwenftError):
    """The user (or a SIGTERM) stopped a launched job. Exit code 130."""

    exit_code = 130


class Stopped(QwenftError):
    """qwenft's own monitor stopped a job (e.g. the loss went NaN). Exit code 1."""

    exit_code = 1


class RowError(Exception):
    """One data row cannot be converted; caught per row and reported with its line (data.convert)."""

    def __init__(self, kind: str, message: str, fld: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.field = kind, message, fld
