"""Vision-language runs as `train`, `chat` and `serve` take them (issue 26): the knobs only a
vision model reads, image data refused on a text model, what the run trains of the model said,
images in a chat and in a served request checked. Fast tier: config-only model folders, the
recording llamafactory-cli; tests/test_e2e_vision.py trains, merges, chats and serves for real."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from PIL import Image

from qwenft import serve as serve_mod
from qwenft.chat import ChatSession
from qwenft.errors import QwenftError
from qwenft.models.target import ModelTarget
from tests.helpers.builders import QWEN2_05B_CONFIG, read_calls, write_model_folder, written
from tests.helpers.cli import dry_run, invoke

pytestmark = pytest.mark.usefixtures("no_token_stats")


@pytest.fixture
def vl_model(tmp_path: Path) -> Path:
    """A folder that looks like a Qwen2-VL checkpoint (config.json only)."""
    config = {**QWEN2_05B_CONFIG, "model_type": "qwen2_vl", "vision_config": {"depth": 2}}
    return write_model_folder(tmp_path / "Qwen2-VL-2B-Instruct", config)


@pytest.fixture
def image_rows(tmp_path: Path) -> Path:
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.new("RGB", (56, 56), (255, 0, 0)).save(folder / "red.png")
    row = {
        "messages": [
            {"role": "user", "content": "<image>What colour is this?"},
            {"role": "assistant", "content": "Red."},
        ],
        "images": ["pics/red.png"],
    }
    data = tmp_path / "images.jsonl"
    data.write_text(json.dumps(row) + "\n")
    return data


def test_vision_run_renders_media_dir_and_says_what_it_freezes(
    fake_cli: Path, vl_model: Path, image_rows: Path
) -> None:
    config, _, result = dry_run("--model", vl_model, "--data", image_rows)
    assert config["template"] == "qwen2_vl"
    assert config["media_dir"] == str(image_rows.parent)  # the images are relative to the data
    assert "vision: the vision tower frozen (--train-vision trains it), the projector frozen" in (
        result.output
    )
    config, _, result = dry_run(
        "--model", vl_model, "--data", image_rows, "--method", "full", "--deepspeed", "none",
        "--train-vision", "--train-projector", "--image-max-pixels", "262144",
    )  # fmt: skip
    assert (
        config["freeze_vision_tower"] is False and config["freeze_multi_modal_projector"] is False
    )
    assert config["image_max_pixels"] == 262144
    assert "the vision tower trained (set), the projector trained (set)" in result.output


@pytest.mark.parametrize(
    ("model", "args", "message"),
    [
        ("text", [], "holds images, and"),
        ("text", ["--train-vision"], "does nothing for"),
        ("vl", ["--train-projector"], "trains no projector under LoRA"),
        ("vl", ["--image-max-pixels", "0"], "--image-max-pixels must be a positive whole number"),
    ],
)
def test_vision_refusals_write_nothing(
    fake_cli: Path,
    local_model: Path,
    vl_model: Path,
    image_rows: Path,
    isolated: Path,
    model: str,
    args: list[str],
    message: str,
) -> None:
    before = written(Path.cwd(), isolated)
    chosen = local_model if model == "text" else vl_model
    result = invoke("train", "--model", chosen, "--data", image_rows, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert written(Path.cwd(), isolated) == before and read_calls(fake_cli) == []


def _target(template: str) -> ModelTarget:
    return ModelTarget("m", None, "", None, "local", template=template, source="m")


def test_chat_images_are_checked_and_refused_on_a_text_model(tmp_path: Path) -> None:
    picture = tmp_path / "red.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(picture)
    vision = ChatSession(_target("qwen2_vl"))
    assert vision.checked_images([picture]) == [str(picture.absolute())]
    with pytest.raises(QwenftError, match="does not exist"):
        vision.checked_images([tmp_path / "nope.png"])
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(QwenftError, match="cannot be decoded"):
        vision.checked_images([tmp_path / "bad.png"])
    with pytest.raises(QwenftError, match="is a text model"):
        ChatSession(_target("qwen")).checked_images([picture])


def _request(url: str) -> dict:
    return {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "colour?"},
                ],
            }
        ],
    }


def test_served_image_parts(tmp_path: Path) -> None:
    picture = tmp_path / "red.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(picture)
    good = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    assert serve_mod.check_image_parts(_request(good), True, False) is None
    cases = [
        (good, False, True, "the served model is a text model"),
        ("https://example.com/a.png", True, True, "fetches no remote images"),
        ("data:image/webp;base64,AAAA", True, True, "must be a base64 png"),
        ("data:image/png;base64,@@@", True, True, "not valid base64"),
        ("data:image/png;base64," + base64.b64encode(b"junk").decode(), True, True, "cannot be decoded"),
        ("data:image/png;base64," + "A" * (serve_mod.MAX_IMAGE_BYTES * 4 // 3 + 8), True, True, "over 20 MB"),
        (str(picture), True, False, "read only by a server on loopback"),
        (str(tmp_path / "nope.png"), True, True, "does not exist"),
    ]  # fmt: skip
    for url, vision, local, message in cases:
        problem = serve_mod.check_image_parts(_request(url), vision, local)
        assert problem is not None and message in problem[0], (url, problem)
        assert problem[1] == "messages[0].content[0]"
    # a local file (or file:// URL) on loopback goes on as a data URL LLaMA-Factory decodes
    for url in (str(picture), f"file://{picture}"):
        body = _request(url)
        assert serve_mod.check_image_parts(body, True, True) is None
        assert body["messages"][0]["content"][0]["image_url"]["url"] == good


def test_serve_says_whether_the_model_sees_images() -> None:
    _, env = serve_mod.build_serve_command("lf", Path("s.yaml"), "0.0.0.0", 8000, "k", "m", "local")
    assert env[serve_mod.VISION_ENV] == "0" and env[serve_mod.LOCAL_FILES_ENV] == "0"
    _, env = serve_mod.build_serve_command(
        "lf", Path("s.yaml"), "127.0.0.1", 8000, None, "m", "local", vision=True
    )
    assert env[serve_mod.VISION_ENV] == "1" and env[serve_mod.LOCAL_FILES_ENV] == "1"


def test_eval_of_image_data_finds_its_images_and_refuses_a_text_model(
    image_rows: Path, tmp_path: Path
) -> None:
    from qwenft.evaluate import build_eval_config, plan_eval

    plan = plan_eval("tiny-qwen2-vl", image_rows, no_base=True)
    cfg = build_eval_config(plan, plan.tuned, tmp_path / "out", predict=False)
    assert cfg["media_dir"] == str(image_rows.parent) and cfg["template"] == "qwen2_vl"
    with pytest.raises(QwenftError, match="is a text model"):
        plan_eval("tiny-qwen2", image_rows, no_base=True)
