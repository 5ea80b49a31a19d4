"""GRPO's rewards: the built-ins, a user's own functions, and the check every reward passes.

A reward is named by a spec (`qwenft train --stage grpo --reward SPEC`, repeatable):

- ``match:FIELD``   1 when the completion's answer equals the row's FIELD (case, surrounding
  whitespace, runs of spaces and a final ``.`` or ``!`` ignored), else 0;
- ``number:FIELD``  1 when the last number in the completion's answer equals the row's FIELD (a
  number, or text holding one: ``"1,234"``, ``"-3.5"``), else 0;
- ``regex:PATTERN`` 1 when the whole completion (stripped) matches PATTERN (Python ``re``, ``.``
  matching newlines too), else 0: a format reward;
- ``tool_call``     1 when the completion holds at least one ``<tool_call>{...}</tool_call>`` and
  every call names a function of the row's ``tools`` with the arguments its JSON schema requires,
  of the types it declares; else 0;
- ``length:N``      1 at N completion tokens, falling linearly to 0 at 0 and at 2N;
- ``run:RUN``       a reward model's score (a run of ``--stage rm``, its value head): the prompt's
  messages and the completion as one conversation, encoded with that run's template as its
  training encoded them (qwenft.rl.reward_model);
- ``PATH.py:FUNCTION`` the user's function, called as TRL calls a reward function:
  ``FUNCTION(prompts=[...], completions=[...], completion_ids=[...], **fields)`` where each field of
  the data rows (``answer``, ``tools``, ...) is a list with one value per completion; it returns one
  float per completion (None: this reward does not apply to that completion).

The answer of a completion is what follows its last ``</think>`` (a reasoning model's thoughts are
not its answer), or all of it.

Every reward's output is checked (`checked`): an exception, a list of the wrong length, or a value
that is not a finite number (NaN, inf, text) stops the run with the reward's name and the data line
of the first row it failed on. Parsing the specs needs nothing but the standard library, so `train`
checks them before launch (`parse_specs`); building them (`build`) happens in the GRPO process.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenft.errors import QwenftError

LINE = "qwenft_line"  # the data line of each prompt, a column the rewards are given
MESSAGES = "qwenft_messages"  # each prompt's messages (JSON), for a reward model's conversation
BUILTINS = ("match", "number", "regex", "tool_call", "length", "run")
REWARD_HINT = (
    "--reward match:FIELD | number:FIELD | regex:PATTERN | tool_call | length:N | run:RM_RUN | "
    "PATH.py:FUNCTION (docs/rl.md)"
)


class RewardError(Exception):
    """A reward function failed on a batch: the message names it and the row."""


@dataclass(frozen=True)
class RewardSpec:
    """One --reward: a built-in with its argument, or a user's file and function."""

    text: str  # as given
    kind: str  # a BUILTINS name, or "file"
    arg: str = ""  # FIELD, PATTERN, N; for "file": the function's name
    path: str = ""  # "file": the Python file; "run": the reward run (absolute once resolved)

    @property
    def name(self) -> str:
        """How messages and the logged figures name it."""
        return self.arg if self.kind == "file" else self.kind

    @property
    def yaml_text(self) -> str:
        """As train.yaml holds it: paths made absolute (the GRPO process runs in the run folder)."""
        if self.kind == "file":
            return f"{self.path}:{self.arg}"
        return f"run:{self.path}" if self.kind == "run" else self.text


def parse_spec(text: str, base: Path | None = None) -> RewardSpec:
    """A --reward value checked (QwenftError naming it); a file's path resolved against base and
    the function looked for in its source (not run: the user's code runs in the training process)."""
    text = str(text).strip()
    head, sep, arg = text.partition(":")
    if head.endswith(".py") and sep:
        path = Path(head).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        _check_function(path, arg, text)
        return RewardSpec(text, "file", arg, str(path.absolute()))
    if head not in BUILTINS:
        raise QwenftError(f"--reward {text!r}: unknown reward", f"use one of: {REWARD_HINT}")
    if head == "tool_call":
        if sep:
            raise QwenftError(f"--reward {text!r}: tool_call takes no argument", REWARD_HINT)
        return RewardSpec(text, head)
    if not arg:
        raise QwenftError(f"--reward {text!r}: {head} needs an argument ({head}:...)", REWARD_HINT)
    if head == "regex":
        try:
            re.compile(arg)
        except re.error as exc:
            raise QwenftError(f"--reward {text!r}: not a regular expression: {exc}") from None
    if head == "length" and not (arg.isdigit() and int(arg) > 0):
        raise QwenftError(f"--reward {text!r}: length takes a positive whole number of tokens")
    if head == "run":
        path = Path(arg).expanduser()
        path = (base / path if base is not None and not path.is_absolute() else path).absolute()
        _check_reward_run(path, text)
        return RewardSpec(text, head, path=str(path))
    return RewardSpec(text, head, arg)


def _check_reward_run(path: Path, text: str) -> None:
    """A run:RUN reward names a reward model: a run of --stage rm with its value head."""
    from qwenft.choices import Stage
    from qwenft.models.target import resolve_target, value_head_path
    from qwenft.runs.manifest import MANIFEST

    if not (path / MANIFEST).is_file():
        raise QwenftError(
            f"--reward {text!r}: {path} is not a qwenft run folder",
            "name a run trained with --stage rm (`qwenft runs` lists them)",
        )
    target = resolve_target(str(path))
    stage = target.manifest.stage if target.manifest else None
    if stage != Stage.RM:
        raise QwenftError(
            f"--reward {text!r}: {path.name} is a {stage} run, not a reward model",
            "name a run trained with --stage rm",
        )
    value_head_path(target)  # QwenftError: its value head is missing


def _check_function(path: Path, name: str, text: str) -> None:
    if not path.is_file():
        raise QwenftError(f"--reward {text!r}: {path} is not a file", REWARD_HINT)
    if not name.isidentifier():
        raise QwenftError(f"--reward {text!r}: name the function after the colon (FILE.py:FUNC)")
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (SyntaxError, UnicodeDecodeError) as exc:
        raise QwenftError(f"--reward {text!r}: {path} is not valid Python: {exc}") from None
    defined = {
        n.name
        for n in tree.body
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    } | {
        t.id
        for n in tree.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    if name not in defined:
        raise QwenftError(
            f"--reward {text!r}: {path.name} defines no {name!r} at its top level",
            f"it defines: {', '.join(sorted(defined)) or 'nothing'}",
        )


def parse_specs(texts: Sequence[str], base: Path | None = None) -> list[RewardSpec]:
    """Every --reward checked; at least one is needed, and a name may not repeat."""
    if not texts:
        raise QwenftError("--stage grpo needs at least one --reward", REWARD_HINT)
    specs = [parse_spec(t, base) for t in texts]
    names = [s.text for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise QwenftError(f"--reward {dup!r} is given twice", "give each reward once")
    return specs


FIELD_REWARDS = ("match", "number")  # the built-ins that read a field of the row


def check_fields(specs: Sequence[RewardSpec], path: Path) -> None:
    """Every row of the prompt file has the fields the built-in rewards read (QwenftError naming
    the first row without one): found before launch, not at the first step."""
    from qwenft.data.reader import BAD, Collector, iter_rows, open_data_file

    wanted = {s.arg: s.text for s in specs if s.kind in FIELD_REWARDS}
    if not wanted:
        return
    path, fh, mode = open_data_file(path)
    with fh:
        for line, row, _raw in iter_rows(fh, mode, Collector()):
            missing = [
                f for f in wanted if row is not BAD and isinstance(row, dict) and f not in row
            ]
            if missing:
                raise QwenftError(
                    f"--reward {wanted[missing[0]]!r} reads the field {missing[0]!r}, and "
                    f"{path.name}:{line} has none; nothing was started",
                    f'give every prompt row its "{missing[0]}" (the reference the reward compares '
                    "with)",
                )


def parse_weights(text: Any, n: int) -> list[float] | None:
    """--reward-weights "1,0.5": one finite number per --reward; None when not given."""
    if text is None or text == "":
        return None
    items = text if isinstance(text, list) else str(text).split(",")
    try:
        weights = [float(w) for w in items]
    except ValueError:
        raise QwenftError(f"--reward-weights {text!r}: not a comma list of numbers") from None
    if len(weights) != n or not all(math.isfinite(w) for w in weights):
        raise QwenftError(
            f"--reward-weights {text!r}: give one finite number for each of the {n} --reward(s)"
        )
    return weights


# --------------------------------------------------------------------------------------------------
# the built-ins (pure functions of the text: tested without a model)

_SPACES = re.compile(r"\s+")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def answer_part(text: str) -> str:
    """What a completion answers: after its last </think>, or all of it."""
    return str(text).rpartition("</think>")[2]


def normalize(text: str) -> str:
    """What match: compares: lower case, whitespace collapsed, a final . or ! dropped."""
    return _SPACES.sub(" ", str(text)).strip().lower().rstrip(".!").strip()


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(str(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def match_score(completion: str, want: Any) -> float:
    return float(want is not None and normalize(answer_part(completion)) == normalize(str(want)))


def number_score(completion: str, want: Any) -> float:
    want_n = want if isinstance(want, int | float) else last_number(str(want))
    got = last_number(answer_part(completion))
    return float(got is not None and want_n is not None and math.isclose(got, want_n, abs_tol=1e-6))


def regex_score(completion: str, pattern: re.Pattern[str]) -> float:
    return float(pattern.fullmatch(completion.strip()) is not None)


def length_score(n_tokens: int, target: int) -> float:
    return max(0.0, 1.0 - abs(n_tokens - target) / target)


_JSON_TYPES = {
    "string": str,
    "integer": int,
    "number": int | float,
    "boolean": bool,
    "object": dict,
    "array": list,
}


def _functions(tools: Any) -> dict[str, dict]:
    """The row's tools (JSON text or a list; OpenAI's {"type": "function", "function": ...} or
    bare functions) by name -> parameters schema."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else []
        except json.JSONDecodeError:
            return {}
    out = {}
    for tool in tools if isinstance(tools, list) else []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out[fn["name"]] = fn.get("parameters") or {}
    return out


def _fits(value: Any, schema: dict) -> bool:
    want = _JSON_TYPES.get(schema.get("type")) if isinstance(schema, dict) else None
    if want is None:
        return True
    if isinstance(value, bool) and schema.get("type") in ("integer", "number"):
        return False
    if not isinstance(value, want):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    return True


def tool_call_score(completion: str, tools: Any) -> float:
    functions = _functions(tools)
    calls = _TOOL_CALL.findall(completion)
    if not calls or not functions:
        return 0.0
    for raw in calls:
        try:
            call = json.loads(raw)
        except json.JSONDecodeError:
            return 0.0
        if not isinstance(call, dict) or call.get("name") not in functions:
            return 0.0
        args = call.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return 0.0
        if not isinstance(args, dict):
            return 0.0
        schema = functions[call["name"]]
        props = schema.get("properties") or {}
        if any(key not in args for key in schema.get("required") or ()):
            return 0.0
        if any(key in props and not _fits(v, props[key]) for key, v in args.items()):
            return 0.0
    return 1.0


# --------------------------------------------------------------------------------------------------
# building them, in the GRPO process

RewardFn = Callable[..., list]


def _field(spec: RewardSpec, kwargs: dict[str, Any], n: int) -> list[Any]:
    values = kwargs.get(spec.arg)
    if values is None:
        raise RewardError(
            f"reward {spec.text!r}: the rows have no field {spec.arg!r} (fields: "
            f"{', '.join(sorted(k for k in kwargs if k not in _TRL_KEYS and k != LINE)) or 'none'})"
        )
    return list(values)


_TRL_KEYS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


def _builtin(spec: RewardSpec) -> RewardFn:
    if spec.kind == "run":
        from qwenft.rl.reward_model import RunReward

        return RunReward(Path(spec.path))
    if spec.kind == "regex":
        pattern = re.compile(spec.arg, re.S)

        def fn(completions: list[str], **kw: Any) -> list[float]:
            return [regex_score(c, pattern) for c in completions]

    elif spec.kind == "length":
        target = int(spec.arg)

        def fn(completions: list[str], completion_ids: list, **kw: Any) -> list[float]:
            return [length_score(len(ids), target) for ids in completion_ids]

    elif spec.kind == "tool_call":

        def fn(completions: list[str], **kw: Any) -> list[float]:
            tools = kw.get("tools") or [None] * len(completions)
            return [tool_call_score(c, t) for c, t in zip(completions, tools, strict=False)]

    else:
        score = match_score if spec.kind == "match" else number_score

        def fn(completions: list[str], **kw: Any) -> list[float]:
            wants = _field(spec, kw, len(completions))
            return [score(c, w) for c, w in zip(completions, wants, strict=True)]

    return fn


def _load_user(spec: RewardSpec) -> RewardFn:
    path = Path(spec.path)
    module_spec = importlib.util.spec_from_file_location(f"qwenft_reward_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise RewardError(f"reward {spec.text!r}: {path} cannot be loaded")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's module: say what it raised
        raise RewardError(
            f"reward {spec.text!r}: importing {path.name} raised {type(exc).__name__}: {exc}"
        ) from exc
    fn = getattr(module, spec.arg, None)
    if not callable(fn):
        raise RewardError(f"reward {spec.text!r}: {path.name}'s {spec.arg} is not callable")
    return fn


def build(spec: RewardSpec) -> RewardFn:
    """The reward as TRL calls it, checked (`checked`), named after the spec."""
    fn = _load_user(spec) if spec.kind == "file" else _builtin(spec)
    wrapped = checked(fn, spec.text, messages=spec.kind == "run")
    wrapped.__name__ = spec.name  # TRL logs rewards/<name>/mean
    return wrapped


def checked(fn: RewardFn, label: str, *, messages: bool = False) -> RewardFn:
    """fn, its output checked: one finite number (or None) per completion; RewardError naming the
    reward and the data line of the first row it failed on, else. messages: fn is also given
    each prompt's messages (`messages=`: a reward model reads the conversation)."""

    def call(prompts: list, completions: list, **kw: Any) -> list[float | None]:
        lines = kw.pop(LINE, None)  # the rewards are given the data's fields only
        convs = kw.pop(MESSAGES, None)
        if messages:
            kw["messages"] = [json.loads(m) for m in convs or ()]
        n = len(completions)

        def where(i: int = 0) -> str:
            return f"data line {lines[i]}" if lines is not None and i < len(lines) else "a batch"

        try:
            out = fn(prompts=prompts, completions=completions, **kw)
        except RewardError:
            raise
        except Exception as exc:  # noqa: BLE001 - the reward's own failure, named
            raise RewardError(
                f"reward {label!r} raised {type(exc).__name__}: {exc} (on the batch from {where()})"
            ) from exc
        if not isinstance(out, list | tuple) or len(out) != n:
            got = f"{len(out)} values" if isinstance(out, list | tuple) else type(out).__name__
            raise RewardError(
                f"reward {label!r} returned {got} for {n} completions (on the batch from "
                f"{where()}): return one float per completion"
            )
        for i, value in enumerate(out):
            if value is None:
                continue
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or not math.isfinite(value):
                raise RewardError(
                    f"reward {label!r} returned {value!r} for completion {i} ({where(i)}): "
                    "a reward must be a finite number (or None where it does not apply)"
                )
        return [None if v is None else float(v) for v in out]

    return call
