"""LLaMA-Factory's own argument list: which keys `llamafactory-cli train` accepts, and the type of
each value. The one place that knows LLaMA-Factory's argument dataclasses.

LLaMA-Factory 0.9.5 parses a training YAML with HfArgumentParser over its `_TRAIN_ARGS`
(ModelArguments, DataArguments, TrainingArguments (transformers' Seq2SeqTrainingArguments plus
LLaMA-Factory's own), FinetuningArguments, GeneratingArguments) and stops with a traceback, after
the 20 s it takes to start, on any key it does not know. `settings.resolve()` checks --config and
--set keys against the same dataclasses first, so a misspelt key costs nothing.

Importing those dataclasses pulls in torch and transformers (about 6 s), so the table of fields is
read once, in a child process (`python -m qwenft.lf.args`), never in-process:

1. `args_snapshot.py`, generated from the real dataclasses by `python -m qwenft.lf.args
   --write-snapshot` for the pinned LLaMA-Factory and the transformers the setup installs; used
   when the installed versions are those (free: the fast tests and `--dry-run` pay nothing). A
   model-tier test (tests/test_refusals.py) proves it equals what the dataclasses say today.
2. otherwise QWENFT_HOME/cache/lf-args-<llamafactory>-<transformers>.json, written (atomically)
   the first time another pair of versions is seen.
3. when neither exists, the child process reads the dataclasses (about 6 s, once per version pair).

No table (LLaMA-Factory not installed beside qwenft, or the child failed): `table()` is None and the
keys go unchecked, as before.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# What a field's value may be. "any": a type qwenft does not check (lists, dicts, unions).
KINDS = ("bool", "int", "float", "str", "choice", "any")
TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Arg:
    """One field of LLaMA-Factory's training arguments."""

    kind: str  # one of KINDS
    nullable: bool = False  # Optional[...]: null is a value
    choices: tuple[Any, ...] = ()  # kind "choice": Literal[...] values or an Enum's values
    owner: str = ""  # the dataclass that declares it (ModelArguments, ...)

    def expected(self) -> str:
        """What the value must be, in words."""
        words = {
            "bool": "true or false",
            "int": "a whole number",
            "float": "a number",
            "str": "text",
            "any": "a value",
        }
        text = (
            "one of " + ", ".join(map(str, self.choices))
            if self.kind == "choice"
            else words[self.kind]
        )
        return text + (" (or null)" if self.nullable else "")


class BadValue(ValueError):
    """A value that LLaMA-Factory would not accept for its key; str() says what it must be
    ("a whole number", "one of a, b")."""


@dataclass(frozen=True)
class ArgTable:
    """Every key LLaMA-Factory's `train` accepts, with its type; `versions` it was read from."""

    versions: dict[str, str]
    fields: dict[str, Arg]
    source: str = ""  # "snapshot", the cache file, or "dataclasses"

    def __contains__(self, key: object) -> bool:
        return key in self.fields

    def suggest(self, key: str, n: int = 3) -> list[str]:
        """The known keys closest to a misspelt one (difflib), best first."""
        return difflib.get_close_matches(key, list(self.fields), n=n, cutoff=0.75)

    def coerce(self, key: str, value: Any) -> Any:
        """value as LLaMA-Factory needs it for key (a number typed as YAML-1.1 text becomes a
        number, a number given for a text field becomes text); BadValue when it cannot be."""
        return coerce(self.fields[key], value)

    def to_json(self) -> dict[str, Any]:
        return {
            "versions": self.versions,
            "fields": {
                k: [a.kind, a.nullable, list(a.choices), a.owner] for k, a in self.fields.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "") -> ArgTable:
        fields = {
            k: Arg(kind, bool(nullable), tuple(choices), owner)
            for k, (kind, nullable, choices, owner) in data["fields"].items()
        }
        return cls(dict(data["versions"]), fields, source)


def coerce(arg: Arg, value: Any) -> Any:
    """The check behind ArgTable.coerce."""
    if value is None:
        if arg.nullable or arg.kind == "any":
            return None
        raise BadValue(arg.expected())
    kind = arg.kind
    if kind == "any":
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "float":
        if isinstance(value, int | float) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise BadValue(arg.expected())
            return value
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as text; LLaMA-Factory's loader does not
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(number):
                    return number
    elif kind == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # run_name: 2024 means the text "2024"
    elif kind == "choice":
        if value in arg.choices:
            return value
        if not isinstance(value, bool) and str(value) in map(str, arg.choices):
            return str(value)
    raise BadValue(arg.expected())


# --------------------------------------------------------------------------------------------------
# finding the table


def installed_versions() -> dict[str, str] | None:
    """The installed llamafactory and transformers versions (read from package metadata, without
    importing them); None when either is missing."""
    try:
        return {p: metadata.version(p) for p in ("llamafactory", "transformers")}
    except metadata.PackageNotFoundError:
        return None


def cache_path(versions: dict[str, str]) -> Path:
    from qwenft.paths import qwenft_home

    tag = "-".join(versions[p] for p in ("llamafactory", "transformers"))
    return qwenft_home() / "cache" / f"lf-args-{tag}.json"


_memo: dict[tuple[str, ...], ArgTable | None] = {}


def table(compute: bool = True) -> ArgTable | None:
    """The argument table for the installed LLaMA-Factory (see the module docstring for where it
    comes from); None when it cannot be had. `compute=False`: only what is already at hand."""
    versions = installed_versions()
    if versions is None:
        return None
    snap = _snapshot()
    if snap is not None and snap.versions == versions:
        return snap
    path = cache_path(versions)
    key = (str(path), *versions.values())
    if key in _memo:
        return _memo[key]
    found: ArgTable | None = None
    if path.is_file():
        try:
            found = ArgTable.from_json(json.loads(path.read_text(encoding="utf-8")), str(path))
        except (OSError, ValueError, KeyError, TypeError):
            found = None  # a damaged cache is read again from the dataclasses
    if found is None and compute:
        found = read_dataclasses()
        if found is not None and found.versions == versions:
            from qwenft.fsutil import atomic_write_json

            try:
                atomic_write_json(path, found.to_json())
            except OSError:
                pass  # a read-only home: the table is still good for this call
    if found is not None:
        _memo[key] = found
    return found


def _snapshot() -> ArgTable | None:
    try:
        from qwenft.lf import args_snapshot
    except ImportError:
        return None
    return ArgTable.from_json(args_snapshot.TABLE, "snapshot")


def read_dataclasses(timeout_s: float = TIMEOUT_S) -> ArgTable | None:
    """Read the table from LLaMA-Factory's dataclasses in a child process (this process stays free
    of torch and transformers); None when the child fails."""
    from qwenft.proc.launcher import capture

    out = capture(
        [sys.executable, "-m", "qwenft.lf.args"],
        timeout_s,
        env={"TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"},
    )
    if out.returncode != 0:
        return None
    try:
        return ArgTable.from_json(json.loads(out.stdout.strip().splitlines()[-1]), "dataclasses")
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def allow_extra_keys() -> bool:
    """LLaMA-Factory's own escape hatch: with ALLOW_EXTRA_ARGS set it ignores unknown keys."""
    return os.environ.get("ALLOW_EXTRA_ARGS", "0").lower() in ("true", "y", "1")


# --------------------------------------------------------------------------------------------------
# the child: read the real dataclasses (imports torch, transformers and llamafactory)


def describe(tp: Any) -> tuple[str, bool, tuple[Any, ...]]:
    """(kind, nullable, choices) of a dataclass field's type."""
    import enum
    import types
    import typing

    origin, params = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in params if a is not type(None)]
        nullable = len(members) < len(params)
    else:
        members, nullable = [tp], False
    enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
    if len(enums) == 1 and all(m is enums[0] or m is str for m in members):
        # `SchedulerType | str`: transformers turns the text into the enum, or fails
        return "choice", nullable, tuple(e.value for e in enums[0])
    if len(members) != 1:
        return "any", nullable, ()
    (m,) = members
    if typing.get_origin(m) is typing.Literal:
        values = typing.get_args(m)
        if all(isinstance(v, str) for v in values):
            return "choice", nullable, values
        return "any", nullable, ()
    for kind, cls in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if m is cls:
            return kind, nullable, ()
    return "any", nullable, ()


def train_dataclasses() -> list[type]:
    """The dataclasses `llamafactory-cli train` parses its YAML with (LLaMA-Factory's own list)."""
    from llamafactory.hparams import parser

    return list(parser._TRAIN_ARGS)


def read_table_here() -> ArgTable:
    """The table from the dataclasses, in this process (the child's work)."""
    import dataclasses
    import typing

    fields: dict[str, Arg] = {}
    for cls in train_dataclasses():
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # an annotation that does not resolve: take the raw ones
            hints = {}
        for f in dataclasses.fields(cls):
            if not f.init:  # HfArgumentParser.parse_dict only takes init fields
                continue
            kind, nullable, choices = describe(hints.get(f.name, f.type))
            fields.setdefault(f.name, Arg(kind, nullable, choices, cls.__name__))
    return ArgTable(installed_versions() or {}, fields, "dataclasses")


def snapshot_text(tbl: ArgTable) -> str:
    """The source of args_snapshot.py for tbl."""
    data = tbl.to_json()
    lines = [
        '"""LLaMA-Factory\'s training arguments, generated from its dataclasses by',
        "`python -m qwenft.lf.args --write-snapshot`; do not edit (see qwenft/lf/args.py).",
        "",
        'Each key: [kind, nullable, choices, the dataclass declaring it]."""',
        "",
        "# fmt: off",
        "TABLE = {",
        f"    'versions': {data['versions']!r},",
        "    'fields': {",
    ]
    lines += [f"        {k!r}: {v!r}," for k, v in sorted(data["fields"].items())]
    lines += ["    },", "}", "# fmt: on", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    tbl = read_table_here()
    if argv[1:] == ["--write-snapshot"]:
        target = Path(__file__).with_name("args_snapshot.py")
        target.write_text(snapshot_text(tbl), encoding="utf-8")
        print(f"wrote {target}: {len(tbl.fields)} keys, {tbl.versions}")
        return 0
    print(json.dumps(tbl.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
