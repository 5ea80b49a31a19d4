"""The run manifest (qwenft.json): a typed record with a schema version, written only here
(atomically) and read by qwenft only through read_manifest.

`train` creates it; `resume`, `merge`, `chat`, `serve`, `eval` and `runs` read it, so the
template, system prompt and thinking mode are always the ones the model was trained with. The
file is plain JSON on purpose: scripts outside the package (scripts/bench.py,
scripts/demo_compare.py) read a few of its keys raw: renaming one of those keys means
changing them too (and raw, a path inside the run folder is relative to it: see below).
Keys written by a newer qwenft are kept as they are (`extra`) and written back unchanged.

A run folder travels (moved, copied, rsynced from a cluster to a laptop): what lies inside it is
written relative to it, and read against the folder the manifest is read from (`stored`,
`resolved`, below: the one place that knows where a run's things are). Paths outside it (the data
file, the base model, a parent run, dataset_dir, the tokenized cache) are kept as given.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from qwenft import __version__
from qwenft.errors import QwenftError
from qwenft.fsutil import atomic_write_json, atomic_write_text
from qwenft.models.presets import ResolvedModel

MANIFEST = "qwenft.json"
SCHEMA_VERSION = 1  # manifests written before it was recorded read as version 0 (same keys)
# prepared: a run folder a scheduler will start (launch.sbatch), submitted: its job is queued
STATUSES = ("prepared", "submitted", "running", "completed", "failed", "interrupted")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def package_versions() -> dict[str, str | None]:
    """Versions of the training stack, read from package metadata (no imports)."""
    out: dict[str, str | None] = {}
    for name in (
        "llamafactory",
        "transformers",
        "torch",
        "peft",
        "deepspeed",
        "bitsandbytes",
        "llama-cpp-python",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class DatasetRecord:
    """The data a run was trained on."""

    path: str
    sha256: str
    name: str  # the dataset_info.json entry
    dataset_dir: str
    samples: int | None = None
    train_path: str | None = (
        None  # what LLaMA-Factory read (a filtered copy with --overlength drop)
    )
    share: float | None = None  # --data FILE:SHARE: its share of an interleaved mixture

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetRecord:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class StopReport:
    """Whether the model has learned to end its turns: of `answers` greedy answers to the run's own
    questions, how many ended on <|im_end|> within `window` new tokens (measured by `qwenft
    export`'s verify, on the merged model). A fact about the model, reported, never a refusal."""

    answers: int
    stopped: int
    window: int
    at: str = field(default_factory=now_iso)

    @property
    def learned(self) -> bool:
        return self.answers > 0 and self.stopped == self.answers

    def short(self) -> str:
        """`3/3`: stopped of answers (`qwenft runs`)."""
        return f"{self.stopped}/{self.answers}"


@dataclass
class Manifest:
    """Everything a run folder records about how it was made and how it ended."""

    method: str
    model: ResolvedModel
    template: str
    default_system: str
    enable_thinking: bool | None
    dataset: DatasetRecord  # the (first) --data file
    command: list[str]
    env: dict[str, str]
    deepspeed: str = "none"
    gpus: int = 1
    nnodes: int = 1
    kind: str = "train"
    stage: str = "sft"  # the training stage (choices.Stage: sft, pt, dpo, orpo, simpo, kto)
    parent_run: str | None = None  # --from RUN_DIR: the run whose weights this one started from
    sources: list[DatasetRecord] = field(default_factory=list)  # the further --data files
    mix: str | None = None  # how the --data files mix (choices.Mix), with several
    eval_data: list[DatasetRecord] = field(default_factory=list)  # --eval-data files
    versions: dict[str, str | None] = field(default_factory=dict)
    overlength: dict[str, Any] = field(default_factory=dict)
    tracking: dict[str, str] | None = None  # --report-to: tracker -> where to look (runs.tracking)
    # --launcher slurm: {"launcher", "script", and once submitted "job_id", "submitted"}
    launch: dict[str, Any] | None = None
    status: str = "running"
    schema_version: int = SCHEMA_VERSION
    qwenft_version: str = __version__
    created: str = field(default_factory=now_iso)
    # set as the run goes
    started: str | None = None
    host: str | None = None  # where the process running it (pid) lives
    pid: int | None = None
    ended: str | None = None
    log: str | None = None
    reason: str | None = None
    returncode: int | None = None
    tokenized_cache: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    final_loss: float | None = None
    tokens_per_second: float | None = None
    resumes: list[dict[str, Any]] = field(default_factory=list)
    merged: str | None = None
    merged_at: str | None = None
    exports: list[dict[str, Any]] = field(default_factory=list)  # qwenft export: GGUF files
    merge_checks: dict[str, Any] | None = None
    stopping: StopReport | None = None  # qwenft export: does the model end its turns?
    last_eval: dict[str, Any] | None = None
    trains: dict[str, Any] | None = None  # what the run trains of its model (train.trains_record)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know

    def data_line(self) -> str:
        """The run's data in a line: `a.jsonl 80% + b.jsonl 20% (interleave); eval held.jsonl`."""
        text = " + ".join(
            Path(r.path).name + (f" {r.share:.0%}" if r.share else "")
            for r in (self.dataset, *self.sources)
        )
        if self.mix:
            text += f" ({self.mix})"
        if self.eval_data:
            text += "; eval " + ", ".join(Path(r.path).name for r in self.eval_data)
        return text

    def to_dict(self, run_dir: Path | None = None) -> dict[str, Any]:
        """The JSON object written to qwenft.json (fields not set yet are left out); with run_dir,
        as stored in that folder: what lies inside it relative to it (`stored`)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.default is None):
                continue
            if f.name == "model":
                value = value.to_dict()
            elif f.name in ("dataset", "stopping"):
                value = dataclasses.asdict(value)
            elif f.name in ("sources", "eval_data"):
                if not value:
                    continue
                value = [dataclasses.asdict(r) for r in value]
            out[f.name] = value
        out = {**out, **self.extra}
        return stored(out, run_dir) if run_dir is not None else out

    @classmethod
    def from_dict(cls, data: dict[str, Any], run_dir: Path | None = None) -> Manifest:
        """The manifest of a JSON object; with run_dir, one read from that folder: what lies
        inside it resolved against it (`resolved`), wherever the folder was when written."""
        if run_dir is not None:
            data = resolved(data, run_dir)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        values["model"] = ResolvedModel.from_dict(data["model"])
        values["dataset"] = DatasetRecord.from_dict(data["dataset"])
        for key in ("sources", "eval_data"):
            values[key] = [DatasetRecord.from_dict(r) for r in data.get(key) or []]
        if isinstance(data.get("stopping"), dict):
            st = data["stopping"]
            values["stopping"] = StopReport(
                **{k: v for k, v in st.items() if k in StopReport.__dataclass_fields__}
            )
        values.setdefault("schema_version", 0)
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def to_json(self, run_dir: Path | None = None) -> str:
        """to_dict as indented JSON (without run_dir: every path absolute, as read)."""
        return json.dumps(self.to_dict(run_dir), indent=2, ensure_ascii=False) + "\n"


def read_manifest(run_dir: Path) -> Manifest:
    """The manifest of a run folder, or QwenftError naming what is wrong."""
    path = Path(run_dir) / MANIFEST
    if not Path(run_dir).exists():
        raise QwenftError(
            f"run folder not found: {run_dir}", "`qwenft runs` lists the runs qwenft knows"
        )
    if not path.is_file():
        raise QwenftError(
            f"{run_dir} is not a qwenft run folder (no {MANIFEST})",
            "pass a folder made by `qwenft train`; `qwenft runs` lists them",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise QwenftError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise QwenftError(f"{path} is not a complete qwenft manifest (not a JSON object)")
    if data.get("schema_version", 0) > SCHEMA_VERSION:
        raise QwenftError(
            f"{path} was written by a newer qwenft (schema {data.get('schema_version')})",
            "upgrade qwenft to read this run",
        )
    try:
        return Manifest.from_dict(data, Path(run_dir))
    except (KeyError, TypeError, AttributeError) as exc:
        raise QwenftError(f"{path} is not a complete qwenft manifest ({exc})") from exc


def update_manifest(run_dir: Path, **changes: Any) -> Manifest:
    """Read, change and atomically rewrite the manifest."""
    manifest = read_manifest(run_dir)
    for key, value in changes.items():
        if key not in Manifest.__dataclass_fields__ or key == "extra":
            raise TypeError(f"unknown manifest field {key!r}")
        setattr(manifest, key, value)
    if manifest.status not in STATUSES:
        raise ValueError(f"unknown run status {manifest.status!r}")
    atomic_write_json(Path(run_dir) / MANIFEST, manifest.to_dict(Path(run_dir)))
    return manifest


# --------------------------------------------------------------------------------------------------
# where a run's things are: inside the folder (relative to it) or outside it (as given)

RUN_VAR = "$RUN"  # the run folder inside text (command, environment, tracking): "$RUN/tb"

# What lies inside the run folder when it is set ("*": each item of a list or value of a dict).
# Paths: written relative to the folder ("train.log", "merged", "export/x.gguf") when inside it,
# else as given (merge --export-dir, eval --output-dir elsewhere).
INSIDE_PATHS: tuple[tuple[str, ...], ...] = (
    ("log",),
    ("merged",),
    ("summary", "log"),
    ("summary", "loss_plot"),
    ("dataset", "train_path"),  # the --overlength drop / pt copy in the folder, else the data file
    ("last_eval", "report"),
    ("exports", "*", "file"),
    ("exports", "*", "modelfile"),
)
# Text that names the folder (launch command, variables, where the trackers wrote): the folder
# written as $RUN.
INSIDE_TEXT: tuple[tuple[str, ...], ...] = (("command", "*"), ("env", "*"), ("tracking", "*"))


def stored(data: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """A manifest's JSON object as written in run_dir: inside paths relative to the folder, the
    folder in text as $RUN; everything else as it is."""

    def rel(value: Any) -> Any:
        inside = _relative(value, run_dir) if isinstance(value, str) else None
        return value if inside is None else inside

    def text(value: Any) -> Any:
        for form in _forms(run_dir):
            value = _swap(value, str(form), RUN_VAR)
        return value

    return _mapped(_mapped(data, INSIDE_PATHS, rel), INSIDE_TEXT, text)


def resolved(data: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """A manifest's JSON object as read from run_dir, wherever it was written: relative paths and
    $RUN against run_dir. Manifests written before paths were relative hold absolute ones: those
    under the folder the run was in then (`written_in`) are re-based onto run_dir; one under no
    such folder that is gone, onto run_dir after the folder's name, if that exists."""
    run_dir = Path(os.path.abspath(run_dir))
    before = [p for p in written_in(data) if p != run_dir]

    def path(value: Any) -> Any:
        if not isinstance(value, str) or not value:
            return value
        if not os.path.isabs(value):
            return str(Path(os.path.normpath(run_dir / value)))
        p = Path(os.path.normpath(value))
        for old in before:
            if p.is_relative_to(old):
                return str(run_dir / p.relative_to(old))
        if not p.exists() and run_dir.name in p.parts:
            tail = p.parts[len(p.parts) - p.parts[::-1].index(run_dir.name) :]
            if (run_dir.joinpath(*tail)).exists():
                return str(run_dir.joinpath(*tail))
        return value

    def text(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        value = re.sub(re.escape(RUN_VAR) + r"(?!\w)", lambda _: str(run_dir), value)
        for old in before:
            value = _swap(value, str(old), str(run_dir))
        return value

    return _mapped(_mapped(data, INSIDE_PATHS, path), INSIDE_TEXT, text)


def written_in(data: dict[str, Any]) -> list[Path]:
    """Where the run folder was when a qwenft that wrote absolute paths last wrote its manifest:
    the folder of the train.yaml its command launches, of its train.log. None for a manifest
    written relative (its command names $RUN/train.yaml)."""
    found: list[Path] = []
    summary = data.get("summary") if isinstance(data.get("summary"), dict) else {}
    command = data.get("command") if isinstance(data.get("command"), list) else []
    named = [(c, "train.yaml") for c in command] + [
        (data.get("log"), "train.log"),
        (summary.get("log"), "train.log"),
    ]
    for value, name in named:
        if isinstance(value, str) and os.path.isabs(value) and Path(value).name == name:
            folder = Path(os.path.normpath(value)).parent
            if folder not in found:
                found.append(folder)
    return found


def relocate_train_yaml(run_dir: Path) -> bool:
    """Point the run's train.yaml at the folder it is in now (output_dir, deepspeed, the trackers'
    folders: LLaMA-Factory reads them when resuming) when the folder was moved since it was
    written; True when it was rewritten. Its text is kept, comments and order included."""
    run_dir = Path(os.path.abspath(run_dir))
    path = run_dir / "train.yaml"
    text = path.read_text(encoding="utf-8")
    config = yaml.safe_load(text) or {}
    old = config.get("output_dir")
    if not isinstance(old, str) or not os.path.isabs(old) or Path(old) == run_dir:
        return False
    if os.path.exists(old) and os.path.samefile(old, run_dir):
        return False
    new = _swap(text, os.path.normpath(old), str(run_dir))
    if (yaml.safe_load(new) or {}).get("output_dir") != str(run_dir):  # a quoted, escaped path
        config = _mapped(config, (("*",),), lambda v: _swap(v, os.path.normpath(old), str(run_dir)))
        header = "".join(line for line in text.splitlines(True) if line.startswith("#"))
        new = header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=1000)
    atomic_write_text(path, new)
    return True


def is_inside(path: str | Path, run_dir: Path) -> bool:
    """Whether path lies in the run folder (its own copy of the data, its merged model...)."""
    return _relative(str(path), run_dir) is not None


def _relative(value: str, run_dir: Path) -> str | None:
    """An absolute path inside run_dir as relative to it ("train.log", "export/x.gguf"); None
    for a path outside it (or one already relative)."""
    if not os.path.isabs(value):
        return None
    path = Path(os.path.normpath(value))
    for form in _forms(run_dir):
        if path.is_relative_to(form):
            return path.relative_to(form).as_posix() or "."
    return None


def _forms(run_dir: Path) -> list[Path]:
    """The folder as given (absolute) and with its links resolved: a path may name either."""
    given = Path(os.path.abspath(run_dir))
    real = Path(os.path.realpath(given))
    return [real, given] if real != given else [given]


def _swap(text: Any, old: str, new: str) -> Any:
    """text with the folder `old` replaced by `new` where it is a whole path or a path's start
    (not /a/run inside /x/a/run, /a/run-merged or /a/run2)."""
    if not isinstance(text, str) or old not in text:
        return text
    return re.sub(rf"(?<![\w.~-]){re.escape(old)}(?![\w.~-])", lambda _: new, text)


def _mapped(
    data: dict[str, Any], keys: tuple[tuple[str, ...], ...], fn: Callable[[Any], Any]
) -> dict[str, Any]:
    """A copy of data with fn applied to the value at each key path ("*": every item)."""
    out = copy.deepcopy(data)

    def walk(node: Any, path: tuple[str, ...]) -> Any:
        if not path:
            return fn(node)
        head, rest = path[0], path[1:]
        if head == "*":
            if isinstance(node, list):
                return [walk(v, rest) for v in node]
            if isinstance(node, dict):
                return {k: walk(v, rest) for k, v in node.items()}
            return node
        if isinstance(node, dict) and node.get(head) is not None:
            node[head] = walk(node[head], rest)
        return node

    for key in keys:
        out = walk(out, key)
    return out
