"""The model to load: a run folder (its merged model if any, else base + adapter; a full
fine-tune's own weights), a model folder, a preset or a hub id, with the template, system prompt
and thinking mode it was trained with. `chat`, `serve`, `eval` and `merge` all start here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenft.choices import Stage, Thinking, own_weights
from qwenft.errors import QwenftError
from qwenft.models import presets
from qwenft.runs.manifest import MANIFEST, Manifest, read_manifest


@dataclass
class ModelTarget:
    model_path: str  # model_name_or_path: a hub id or an absolute folder
    adapter_path: str | None
    system: str
    enable_thinking: bool | None
    model_kind: str  # "tiny" | "hub" | "local"
    tiny_preset: str | None = None
    source: str = ""  # what to show: "merged model ...", "base + adapter ..."
    template: str = "qwen"  # LLaMA-Factory's name, for engines that go through LLaMA-Factory
    run_dir: Path | None = None  # when the target is a run folder
    manifest: Manifest | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model_path, "adapter": self.adapter_path, "source": self.source}

    def ensure_built(self, progress: Callable[[str], None] = print) -> None:
        """Build the embedded tiny model if the target is one and it is not cached yet."""
        if self.tiny_preset:
            from qwenft.models.tiny import ensure_tiny_model

            ensure_tiny_model(self.tiny_preset, progress=progress)


def reward_refusal(run_dir: Path, m: Manifest, doing: str) -> QwenftError | None:
    """Why a run cannot `doing` (None: it can): a reward model (a run of --stage rm) scores
    conversations and generates no text, so chat, serve and GGUF export refuse it."""
    if m.stage not in Stage.values() or not Stage(m.stage).facts.reward:
        return None
    return QwenftError(
        f"{run_dir} is a reward model (--stage rm): it scores answers and generates no text, so "
        f"it cannot {doing}",
        f"score conversations or chosen/rejected pairs with it: qwenft score {run_dir} FILE",
    )


def refuse_reward_model(target: ModelTarget, doing: str) -> None:
    """reward_refusal of a target that is a run folder; raises it."""
    if target.manifest is not None and target.run_dir is not None:
        refusal = reward_refusal(target.run_dir, target.manifest, doing)
        if refusal is not None:
            raise refusal


def check_template(trained: str, requested: str | None, force: bool) -> str:
    """The template must be the one the model was trained with, unless the user insists."""
    if requested and requested != trained and not force:
        raise QwenftError(
            f"this model was trained with template {trained!r}, not {requested!r}",
            "drop --template (the run's own is used), or add --force if you really mean it",
        )
    return requested or trained


def thinking_mode(
    own: bool | None, requested: str, force: bool = False, *, trained: bool = True
) -> bool | None:
    """The one thinking rule of `chat`, `serve` and `eval`: the mode to use with a target.

    own: the target's mode: a run's trained mode (its manifest's enable_thinking); for a model as
    it comes, the mode `train` would choose on the data at hand (data.reasoning.thinking_plan:
    `eval` has data, `chat` and `serve` have none, which gives off for a hybrid Qwen3); None when
    its template has no thinking switch. trained: own is a run's trained mode.

    - auto (and `serve`, which has no --thinking): own;
    - on or off for a template without a switch: refused (there is nothing to switch);
    - off after a run trained with thinking on: allowed (thinking on trains both of Qwen3's modes
      when the data mixes reasoning and direct answers);
    - on after a run trained with thinking off (its thoughts removed): refused unless --force.
    """
    requested = str(requested).lower()
    if requested == Thinking.AUTO:
        return own
    if own is None:
        raise QwenftError(
            f"--thinking {requested}: this model's template has no thinking mode",
            "drop --thinking (a Qwen3 hybrid model with the qwen3 template has one)",
        )
    wanted = requested == Thinking.ON
    if trained and wanted and own is False and not force:
        raise QwenftError(
            "this run was trained with thinking off (its thoughts removed), not on",
            "drop --thinking (the run's own mode is used), or add --force if you really mean it",
        )
    return wanted


def base_target(model: presets.ResolvedModel, template: str | None = None) -> ModelTarget:
    """A model as it comes (preset, hub id, folder): its family's system prompt, thinking off."""
    return ModelTarget(
        model.path,
        None,
        model.default_system,
        False if model.thinking == "hybrid" else None,
        model.kind,
        tiny_preset=model.spec.lower() if model.kind == "tiny" else None,
        source=model.path,
        template=template or model.template,
    )


def resolve_target(
    spec: str, adapter: Path | None = None, template: str | None = None, force: bool = False
) -> ModelTarget:
    """A run folder (merged model if any, else base + adapter), a model folder, or a preset."""
    path = Path(spec).expanduser()
    if (path / MANIFEST).is_file():
        return _run_target(path.absolute(), adapter, template, force)
    if adapter is not None and not Path(adapter).expanduser().exists():
        raise QwenftError(f"adapter folder not found: {adapter}", "check the path")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise QwenftError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    if not path.exists() and _looks_like_folder(spec):
        raise QwenftError(
            f"run folder or model folder not found: {spec}",
            "check the path: `qwenft runs` lists run folders; or give a preset (`qwenft models`) "
            "or a Qwen hub id such as Qwen/Qwen2.5-7B-Instruct",
        )
    target = base_target(presets.resolve_model(spec), template)
    if adapter is not None:
        target.adapter_path = str(adapter_folder(Path(adapter)).absolute())
    return target


VALUE_HEAD = "value_head.safetensors"  # a reward model's head (LLaMA-Factory's file name)


def value_head_path(target: ModelTarget) -> Path:
    """Where the target's value head is; QwenftError when it has none (not a reward model)."""
    folders = [target.adapter_path, target.model_path, target.run_dir]
    for folder in folders:
        if folder and (Path(folder) / VALUE_HEAD).is_file():
            return Path(folder) / VALUE_HEAD
    raise QwenftError(
        f"{target.source or target.model_path} has no value head ({VALUE_HEAD}): it is not a "
        "reward model",
        "score with a run trained with --stage rm (`qwenft runs` shows each run's stage)",
    )


PISSA_CONVERTED = "pissa_converted"


def adapter_folder(folder: Path) -> Path:
    """The adapter of a run (or adapter) folder as a LoRA over the original base: a PiSSA run's
    own adapter is relative to the residual weights PiSSA left in the base, so LLaMA-Factory's
    plain-LoRA copy (pissa_convert: RUN/pissa_converted, rank doubled) is the one to apply."""
    converted = Path(folder) / PISSA_CONVERTED
    return converted if (converted / "adapter_config.json").is_file() else Path(folder)


def _looks_like_folder(spec: str) -> bool:
    """A spec meant as a path rather than a preset or hub id: ./x, /x, ~/x, a/b/c, or a/b where
    the folder a exists here (runs/typo: the runs folder is there, so a run was meant)."""
    key = spec.strip()
    known = {p.name.lower() for p in presets.PRESETS.values()}
    known |= {p.hub_id.lower() for p in presets.PRESETS.values() if p.hub_id}
    if key.lower() in known:
        return False
    if key.startswith((".", "/", "~")) or key.count("/") > 1:
        return True
    head, sep, _ = key.partition("/")
    return bool(sep) and Path(head).expanduser().is_dir()


def _run_target(
    run_dir: Path, adapter: Path | None, template: str | None, force: bool
) -> ModelTarget:
    m = read_manifest(run_dir)
    common: dict[str, Any] = {
        "system": m.default_system,
        "enable_thinking": m.enable_thinking,
        "template": check_template(m.template, template, force),
        "run_dir": run_dir,
        "manifest": m,
    }
    if adapter is None and m.merged and Path(m.merged).is_dir():
        return ModelTarget(
            m.merged, None, model_kind="local", source=f"merged model {m.merged}", **common
        )
    if own_weights(m.method):
        if not (run_dir / "config.json").is_file():
            raise QwenftError(f"{run_dir} holds no trained weights (status: {m.status})")
        return ModelTarget(str(run_dir), None, model_kind="local", source=str(run_dir), **common)
    adapter_dir = adapter_folder(Path(adapter) if adapter else run_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise QwenftError(
            f"{adapter_dir} has no adapter (status: {m.status})",
            "use a run whose training completed; `qwenft runs` shows statuses",
        )
    return ModelTarget(
        run_base_path(run_dir, m),
        str(adapter_dir.absolute()),
        model_kind=m.model.kind,
        tiny_preset=m.model.spec.lower() if m.model.kind == "tiny" else None,
        source=f"{m.model.spec} + adapter {adapter_dir}",
        **common,
    )


def run_base_path(run_dir: Path, m: Manifest) -> str:
    """The base model an adapter run loads, where the manifest says (a path outside the run
    folder, kept as given), else refused naming it. A tiny preset's build that is gone is the one
    in this QWENFT_HOME (built on first use, the same weights: a run folder moved to another
    machine or home); a hub id is the hub's."""
    path = m.model.path
    if m.model.kind == "hub" or Path(path).is_dir():
        return path
    if m.model.kind == "tiny":
        return presets.resolve_model(m.model.spec).path
    raise QwenftError(
        f"the base model of {run_dir} is missing: {path} (recorded in its manifest; a moved or "
        "copied run folder keeps the path of the base it was trained on)",
        f"put the base model (or a link to it) at {path}; chat, serve and eval also take it as "
        f"MODEL --adapter {run_dir}",
    )
