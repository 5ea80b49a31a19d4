"""The run manifest (qwenft.json): a typed record with a schema version, written only here
(atomically) and read by qwenft only through read_manifest.

`train` creates it; `resume`, `merge`, `chat`, `serve`, `eval` and `runs` read it, so the
template, system prompt and thinking mode are always the ones the model was trained with. The
file is plain JSON on purpose: scripts outside the package (scripts/bench.py,
scripts/demo_compare.py) read a few of its keys raw: renaming one of those keys means
changing them too.
Keys written by a newer qwenft are kept as they are (`extra`) and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from qwenft import __version__
from qwenft.errors import QwenftError
from qwenft.fsutil import atomic_write_json
from qwenft.models.presets import ResolvedModel

MANIFEST = "qwenft.json"
SCHEMA_VERSION = 1  # manifests written before it was recorded read as version 0 (same keys)
STATUSES = ("running", "completed", "failed", "interrupted")


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
    dataset: DatasetRecord
    command: list[str]
    env: dict[str, str]
    deepspeed: str = "none"
    gpus: int = 1
    nnodes: int = 1
    kind: str = "train"
    stage: str = "sft"  # the training stage (choices.Stage: sft, pt, dpo, orpo, simpo, kto)
    parent_run: str | None = None  # --from RUN_DIR: the run whose weights this one started from
    versions: dict[str, str | None] = field(default_factory=dict)
    overlength: dict[str, Any] = field(default_factory=dict)
    tracking: dict[str, str] | None = None  # --report-to: tracker -> where to look (runs.tracking)
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
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to qwenft.json (fields not set yet are left out)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.default is None):
                continue
            if f.name == "model":
                value = value.to_dict()
            elif f.name in ("dataset", "stopping"):
                value = dataclasses.asdict(value)
            out[f.name] = value
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        values["model"] = ResolvedModel.from_dict(data["model"])
        ds = data["dataset"]
        values["dataset"] = DatasetRecord(
            **{k: v for k, v in ds.items() if k in DatasetRecord.__dataclass_fields__}
        )
        if isinstance(data.get("stopping"), dict):
            st = data["stopping"]
            values["stopping"] = StopReport(
                **{k: v for k, v in st.items() if k in StopReport.__dataclass_fields__}
            )
        values.setdefault("schema_version", 0)
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"


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
        return Manifest.from_dict(data)
    except (KeyError, TypeError) as exc:
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
    atomic_write_json(Path(run_dir) / MANIFEST, manifest.to_dict())
    return manifest
