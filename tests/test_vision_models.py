"""Vision-language models: the Qwen2-VL / Qwen2.5-VL / Qwen3-VL presets and templates, the
embedded tiny-qwen2-vl, and torchvision on the CPU install (qwenft.models.torchvision_cpu)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import sysconfig
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from qwenft.choices import VISION_TEMPLATES, Template
from qwenft.models import presets, torchvision_cpu
from qwenft.models.presets import FAMILIES, PRESETS, family_from_name, resolve_model
from qwenft.models.tiny import (
    IMAGE_PAD_ID,
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN2_VL_PREPROCESSOR,
    TINY_PRESETS,
    VISION_START_ID,
)
from tests.helpers.cli import invoke

# --------------------------------------------------------------------------------------------------
# presets and templates (fast tier)

# hub id -> (family, LLaMA-Factory 0.9.5 template: extras/constants.py's model groups)
VL_PRESETS = {
    "Qwen/Qwen2-VL-2B-Instruct": ("qwen2-vl", "qwen2_vl"),
    "Qwen/Qwen2-VL-7B-Instruct": ("qwen2-vl", "qwen2_vl"),
    "Qwen/Qwen2-VL-72B-Instruct": ("qwen2-vl", "qwen2_vl"),
    "Qwen/Qwen2.5-VL-3B-Instruct": ("qwen2.5-vl", "qwen2_vl"),
    "Qwen/Qwen2.5-VL-7B-Instruct": ("qwen2.5-vl", "qwen2_vl"),
    "Qwen/Qwen2.5-VL-32B-Instruct": ("qwen2.5-vl", "qwen2_vl"),
    "Qwen/Qwen2.5-VL-72B-Instruct": ("qwen2.5-vl", "qwen2_vl"),
    **{
        f"Qwen/Qwen3-VL-{size}-{kind}": (family, template)
        for size in ("2B", "4B", "8B", "32B")
        for kind, family, template in (
            ("Instruct", "qwen3-vl", "qwen3_vl_nothink"),
            ("Thinking", "qwen3-vl-thinking", "qwen3_vl"),
        )
    },
}
# Published parameter counts (the model cards), vision encoder included.
PUBLISHED_B = {
    "qwen2-vl-2b-instruct": 2.21,
    "qwen2-vl-7b-instruct": 8.29,
    "qwen2.5-vl-3b-instruct": 3.75,
    "qwen2.5-vl-7b-instruct": 8.29,
    "qwen2.5-vl-72b-instruct": 73.4,
    "qwen3-vl-8b-instruct": 8.77,
}


@pytest.mark.parametrize("hub_id", VL_PRESETS)
def test_vl_presets_resolve_to_their_templates(hub_id: str) -> None:
    family, template = VL_PRESETS[hub_id]
    for spec in (hub_id, hub_id.split("/")[1].lower()):
        model = resolve_model(spec)
        assert (model.kind, model.path, model.family, model.template) == (
            "hub",
            hub_id,
            family,
            template,
        )
        assert FAMILIES[model.family].vision and Template(model.template).vision
    assert model.thinking == ("always" if "Thinking" in hub_id else "none")
    want_system = "You are a helpful assistant." if template == "qwen2_vl" else ""
    assert model.default_system == want_system


def test_vision_templates_and_families() -> None:
    assert {t.value for t in VISION_TEMPLATES} == {"qwen2_vl", "qwen3_vl", "qwen3_vl_nothink"}
    assert not any(Template(t).vision for t in ("qwen", "qwen3", "qwen3_nothink"))
    for template in VISION_TEMPLATES:  # a --template override names a vision family
        family = FAMILIES[presets.template_family(template)]
        assert family.vision and family.template == template
    assert {f.name for f in FAMILIES.values() if f.vision} == {
        "qwen2-vl",
        "qwen2.5-vl",
        "qwen3-vl",
        "qwen3-vl-thinking",
    }
    for family in FAMILIES.values():
        assert family.vision == Template(family.template).vision, family.name


@pytest.mark.parametrize(
    ("name", "model_type", "family"),
    [
        ("Qwen2-VL-7B-Instruct", None, "qwen2-vl"),
        ("qwen2_vl_merged", None, "qwen2-vl"),
        ("my-finetune", "qwen2_vl", "qwen2-vl"),
        ("Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", "qwen2.5-vl"),
        ("my-finetune", "qwen2_5_vl", "qwen2.5-vl"),
        ("Qwen3-VL-8B-Instruct", "qwen3_vl", "qwen3-vl"),
        ("Qwen3-VL-8B-Thinking", "qwen3_vl", "qwen3-vl-thinking"),
        ("my-finetune", "qwen3_vl_moe", "qwen3-vl"),
        ("tiny-qwen2-vl", None, "qwen2-vl"),
        # the text families are unchanged
        ("Qwen2.5-7B-Instruct", "qwen2", "qwen2.5"),
        ("my-finetune", "qwen2", "qwen2"),
        ("Qwen3-8B", "qwen3", "qwen3"),
    ],
)
def test_family_from_name_and_model_type(name: str, model_type: str | None, family: str) -> None:
    assert family_from_name(name, model_type) == family


def test_params_include_the_vision_encoder() -> None:
    for name, billions in PUBLISHED_B.items():
        assert PRESETS[name].arch.params / 1e9 == pytest.approx(billions, rel=0.005), name
    for name in ("qwen2-vl-7b-instruct", "qwen2.5-vl-7b-instruct"):  # LM of Qwen2-7B + the ViT
        arch = PRESETS[name].arch
        assert arch.params - arch.vision_params == PRESETS["qwen2-7b-instruct"].arch.params
    assert PRESETS["qwen2-7b-instruct"].arch.vision_params == 0


def test_local_vl_folders(tmp_path: Path) -> None:
    # Qwen2-VL as Qwen publishes it (flat) and Qwen3-VL (text_config, as transformers 5 saves any)
    flat = tmp_path / "Qwen2-VL-7B-Instruct"
    flat.mkdir()
    (flat / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen2_vl",
                "hidden_size": 3584,
                "intermediate_size": 18944,
                "num_hidden_layers": 28,
                "num_attention_heads": 28,
                "num_key_value_heads": 4,
                "vocab_size": 152064,
                "tie_word_embeddings": False,
                "vision_config": {**presets.VIT_QWEN2_VL, "in_chans": 3, "hidden_size": 3584},
            }
        )
    )
    nested = tmp_path / "vl-run-merged"
    nested.mkdir()
    (nested / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen3_vl",
                "tie_word_embeddings": False,
                "text_config": {
                    "hidden_size": 4096,
                    "intermediate_size": 12288,
                    "num_hidden_layers": 36,
                    "num_attention_heads": 32,
                    "num_key_value_heads": 8,
                    "head_dim": 128,
                    "vocab_size": 151936,
                },
                "vision_config": {**presets.VIT_QWEN3_VL_SO400M, "out_hidden_size": 4096},
            }
        )
    )
    for folder, preset, template in (
        (flat, "qwen2-vl-7b-instruct", "qwen2_vl"),
        (nested, "qwen3-vl-8b-instruct", "qwen3_vl_nothink"),
    ):
        model = resolve_model(str(folder))
        assert (model.kind, model.family, model.template) == (
            "local",
            PRESETS[preset].family,
            template,
        )
        assert model.arch == PRESETS[preset].arch, preset


def test_models_lists_the_vision_presets() -> None:
    rows = {r["name"]: r for r in json.loads(invoke("models", "--json").output)}
    tiny = rows["tiny-qwen2-vl"]
    assert (tiny["hub_id"], tiny["family"], tiny["template"], tiny["vision"]) == (
        None,
        "qwen2-vl",
        "qwen2_vl",
        True,
    )
    assert rows["qwen3-vl-4b-thinking"]["template"] == "qwen3_vl" and not rows["qwen3-4b"]["vision"]
    table = invoke("models").output
    assert "qwen3-vl-8b-instruct" in table and "qwen3_vl_nothink" in table


def test_tiny_vl_preset_matches_its_build_spec() -> None:
    spec = TINY_PRESETS["tiny-qwen2-vl"]
    assert spec["template"] == FAMILIES[PRESETS["tiny-qwen2-vl"].family].template == "qwen2_vl"
    vision, text = spec["config"]["vision_config"], spec["config"]["text_config"]
    assert {k: vision[k] for k in presets.TINY_VISION_QWEN2_VL} == presets.TINY_VISION_QWEN2_VL
    arch = PRESETS["tiny-qwen2-vl"].arch
    assert (arch.hidden_size, arch.num_hidden_layers, arch.vocab_size) == (
        text["hidden_size"],
        text["num_hidden_layers"],
        text["vocab_size"],
    )
    assert (vision["patch_size"], vision["spatial_merge_size"], vision["hidden_size"]) == (
        14,
        2,
        64,
    )
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert sum(text["rope_parameters"]["mrope_section"]) * 2 == head_dim  # M-RoPE covers a head


# --------------------------------------------------------------------------------------------------
# the torchvision hook (fast tier: nothing here imports torch)


def test_hook_is_light_and_acts_only_on_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path])
    # as in a process that has not imported torchvision yet (another test of this worker may have)
    monkeypatch.delitem(sys.modules, torchvision_cpu.TRIGGER, raising=False)
    torchvision_cpu.uninstall()
    torchvision_cpu.install()
    torchvision_cpu.install()
    assert sum(isinstance(f, torchvision_cpu.Hook) for f in sys.meta_path) == 1
    assert isinstance(sys.meta_path[0], torchvision_cpu.Hook)
    hook = sys.meta_path[0]
    assert hook.find_spec("json") is None and hook.find_spec("torchvision") is None
    assert torchvision_cpu.installed()
    # the trigger without torchvision.extension imported (no torchvision here): nothing to define
    monkeypatch.delitem(sys.modules, "torchvision.extension", raising=False)
    assert hook.find_spec(torchvision_cpu.TRIGGER) is None
    assert not torchvision_cpu.installed()  # it acts once, then leaves sys.meta_path


def test_pth_line_starts_nothing_heavy(tmp_path: Path) -> None:
    """The .pth line installs the hook without importing torch, nor the qwenft package (which
    would then be this checkout's in every interpreter, whatever copy sys.path names)."""
    pth = Path(torchvision_cpu.write_pth(str(tmp_path)))
    line = torchvision_cpu.pth_line()
    assert pth.name == torchvision_cpu.PTH_NAME and pth.read_text() == line
    assert line.startswith("import ") and line.count("\n") == 1  # what site runs of a .pth
    code = (
        f"import sys; exec({line.strip()!r}); "
        "assert not {'torch', 'torchvision', 'qwenft'} & set(sys.modules), 'imported at start'; "
        f"assert any(getattr(f, {torchvision_cpu.MARK!r}, 0) for f in sys.meta_path), 'no hook'"
    )
    subprocess.run([sys.executable, "-S", "-c", code], check=True)  # -S: not the venv's own .pth


def _cpu_torch_with_torchvision() -> bool:
    try:
        return "+cpu" in metadata.version("torch") and bool(metadata.version("torchvision"))
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _cpu_torch_with_torchvision(), reason="the CPU install's vision extra")
def test_cpu_install_has_the_hook() -> None:
    """setup_env.sh put the .pth beside CPU torch and PyPI's torchvision (the vision extra)."""
    site = Path(sysconfig.get_paths()["purelib"])
    assert (site / torchvision_cpu.PTH_NAME).read_text() == torchvision_cpu.pth_line()


# --------------------------------------------------------------------------------------------------
# the tiny model and the vision encoders (model tier)

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
needs_torchvision = pytest.mark.skipif(
    not HAS_TORCHVISION, reason="the vision extra (torchvision) is not installed"
)


@pytest.fixture
def tiny_vl(tiny_home: Path) -> Path:
    from qwenft.models.tiny import ensure_tiny_model

    return ensure_tiny_model("tiny-qwen2-vl", progress=None)  # built once a session (conftest)


def test_tiny_vl_files(tiny_vl: Path) -> None:
    cfg = json.loads((tiny_vl / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_vl"
    assert cfg["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert (cfg["image_token_id"], cfg["vision_start_token_id"]) == (IMAGE_PAD_ID, VISION_START_ID)
    assert cfg["tie_word_embeddings"] is True
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]) == (64, 2, 151936)
    assert text["rope_parameters"]["mrope_section"] == [2, 3, 3]
    assert (vision["depth"], vision["embed_dim"], vision["patch_size"]) == (2, 32, 14)
    assert (vision["spatial_merge_size"], vision["hidden_size"]) == (2, 64)
    assert json.loads((tiny_vl / "preprocessor_config.json").read_text()) == QWEN2_VL_PREPROCESSOR
    assert (tiny_vl / "chat_template.jinja").read_text() == QWEN2_VL_CHAT_TEMPLATE
    gen = json.loads((tiny_vl / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643] and gen["do_sample"] is False
    tok = json.loads((tiny_vl / "tokenizer_config.json").read_text())
    assert (tok["eos_token"], tok["pad_token"]) == ("<|im_end|>", "<|endoftext|>")
    assert (tiny_vl / "model.safetensors").stat().st_size < 45_000_000


def test_tiny_vl_build_is_deterministic(tiny_vl: Path, tmp_path: Path, vocab_file: Path) -> None:
    from qwenft.models.tiny import ensure_tiny_model

    (tmp_path / "other" / "vocab").mkdir(parents=True)
    (tmp_path / "other" / "vocab" / "qwen.tiktoken").symlink_to(vocab_file)
    other = ensure_tiny_model("tiny-qwen2-vl", home=tmp_path / "other", progress=None)
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "tokenizer.json"):
        assert (other / name).read_bytes() == (tiny_vl / name).read_bytes(), name


# Run in a fresh interpreter: the CPU install's torchvision must load through the .pth hook.
_LOAD_AND_RUN = textwrap.dedent(
    """
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration
    import torchvision

    folder = sys.argv[1]
    processor = AutoProcessor.from_pretrained(folder)
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()
    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What colour is this picture?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.new("RGB", (56, 56), (255, 0, 0))],
                       return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    emb = model.get_input_embeddings().weight
    blue = processor(text=[text], images=[Image.new("RGB", (56, 56), (0, 0, 255))],
                     return_tensors="pt")
    with torch.no_grad():
        red_f = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        blue_f = model.model.get_image_features(blue["pixel_values"], blue["image_grid_thw"])
    red_f, blue_f = (getattr(f, "pooler_output", f) for f in (red_f, blue_f))
    red_f, blue_f = (torch.cat(list(f)) if isinstance(f, (list, tuple)) else f
                     for f in (red_f, blue_f))
    print(json.dumps({
        "processor": type(processor).__name__,
        "image_processor": type(processor.image_processor).__name__,
        "text": text,
        "image_pads": inputs["input_ids"][0].tolist().count(151655),
        "grid": inputs["image_grid_thw"].tolist(),
        "logits": list(logits.shape),
        "finite": bool(torch.isfinite(logits).all()),
        "generated": out.shape[1] - inputs["input_ids"].shape[1],
        "params": model.num_parameters(),
        "vision_params": sum(p.numel() for p in model.model.visual.parameters()),
        "tied": model.get_output_embeddings().weight.data_ptr() == emb.data_ptr(),
        "emb_std": emb.std().item(),
        "image_norm": red_f.norm(dim=-1).mean().item(),
        "image_cos": torch.nn.functional.cosine_similarity(red_f, blue_f, dim=-1).mean().item(),
        "compiled_ops": torchvision.extension._has_ops(),
    }))
    """
)


@needs_torchvision
def test_tiny_vl_loads_with_auto_processor_and_runs_an_image(tiny_vl: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_RUN, str(tiny_vl)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (got["processor"], got["image_processor"]) == (
        "Qwen2VLProcessor",
        "Qwen2VLImageProcessor",
    )
    assert got["text"] == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What colour is this picture?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # 56x56 pixels: 4x4 patches of 14, merged 2x2 into 4 image tokens
    assert got["image_pads"] == 4 and got["grid"] == [[1, 4, 4]]
    assert got["logits"][2] == 151936 and got["finite"] and got["generated"] >= 1
    assert got["params"] == pytest.approx(PRESETS["tiny-qwen2-vl"].arch.params, abs=1000)
    assert got["vision_params"] == PRESETS["tiny-qwen2-vl"].arch.vision_params
    assert got["tied"] and abs(got["emb_std"] - 0.5) < 0.01  # EMBED_STD: LoRA can learn
    # image tokens enter at about a word's scale (norm 4) and tell colours apart
    assert 4 < got["image_norm"] < 12 and got["image_cos"] < 0.9
    if _cpu_torch_with_torchvision():
        assert got["compiled_ops"] is False  # PyPI's CUDA build beside CPU torch: the hook's case


@needs_torchvision
@pytest.mark.skipif(not _cpu_torch_with_torchvision(), reason="the CPU install's torchvision")
def test_cpu_torchvision_needs_the_hook(tiny_vl: Path) -> None:
    """Without the hook, PyPI's torchvision does not import beside CPU torch; with it, it does,
    and its compiled ops say they are missing when called."""
    without = subprocess.run(
        [
            sys.executable,
            "-c",
            "import qwenft.models.torchvision_cpu as m; m.uninstall(); import torchvision",
        ],
        capture_output=True,
        text=True,
    )
    assert without.returncode != 0 and "torchvision::nms does not exist" in without.stderr
    code = (
        "import torch, torchvision\n"
        "assert not torchvision.extension._has_ops()\n"
        "try:\n"
        "    torchvision.ops.nms(torch.rand(2, 4), torch.rand(2), 0.5)\n"
        "except RuntimeError as exc:\n"
        '    assert "Couldn\'t load custom C++ ops" in str(exc)\n'
        "else:\n"
        "    raise SystemExit('nms ran')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


VISION_ENCODERS = [  # (preset, its vision_config as its config.json has it)
    ("qwen2-vl-7b-instruct", presets.VIT_QWEN2_VL),
    ("qwen2.5-vl-3b-instruct", presets.VIT_QWEN2_5_VL),
    ("qwen3-vl-4b-instruct", presets.VIT_QWEN3_VL_LARGE),
    ("qwen3-vl-32b-instruct", presets.VIT_QWEN3_VL_SO400M),
]


def test_vision_params_equal_transformers_count(tiny_vl: Path) -> None:
    """presets.vision_params is the parameter count of transformers' own vision encoders, built on
    the meta device from each release's vision_config (and the tiny model's, from its folder)."""
    import torch
    import transformers
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
    from transformers.models.qwen2_vl import modeling_qwen2_vl
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    for name, vision in VISION_ENCODERS:
        out = PRESETS[name].arch.hidden_size
        with torch.device("meta"):
            if name.startswith("qwen2-vl"):
                config = transformers.Qwen2VLConfig(vision_config={**vision, "hidden_size": out})
                encoder = modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel._from_config(
                    config.vision_config
                )
            elif name.startswith("qwen2.5-vl"):
                config = transformers.Qwen2_5_VLConfig(
                    vision_config={**vision, "out_hidden_size": out}
                )
                encoder = modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel._from_config(
                    config.vision_config
                )
            else:
                config = transformers.Qwen3VLConfig(
                    vision_config={**vision, "out_hidden_size": out}
                )
                encoder = modeling_qwen3_vl.Qwen3VLVisionModel._from_config(config.vision_config)
        assert count(encoder) == PRESETS[name].arch.vision_params, name
    tiny = resolve_model(str(tiny_vl))  # a local folder: from its config.json
    assert tiny.family == "qwen2-vl" and tiny.arch == PRESETS["tiny-qwen2-vl"].arch


def test_plan_with_image_data_counts_the_vision_tower(tiny_home: Path, tmp_path: Path) -> None:
    """`plan --data` on image rows: the most images a row holds, and with --train-vision the
    tower's kept activations in the breakdown."""
    from PIL import Image

    from tests.helpers.builders import write_jsonl

    Image.new("RGB", (56, 56), (255, 0, 0)).save(tmp_path / "red.png")
    row = {
        "messages": [
            {"role": "user", "content": "<image><image>Same colour?"},
            {"role": "assistant", "content": "Yes."},
        ],
        "images": ["red.png", "red.png"],
    }
    data = write_jsonl(tmp_path / "pics.jsonl", [row])
    args = ("plan", "--model", "tiny-qwen2-vl", "--data", data, "--json")
    out = json.loads(invoke(*args, "--train-vision").stdout)
    assert out["data"]["images"] == 2
    assert out["breakdown"]["vision_activations"] > 0
    frozen = json.loads(invoke(*args).stdout)
    assert (
        "vision_activations" not in frozen["breakdown"]
        or not frozen["breakdown"]["vision_activations"]
    )
    assert any("the vision tower is frozen" in n for n in frozen["notes"])
