"""Image rows (qwenft.data.images, issue 26): the token count of an image, `data check` on image
data (missing, corrupt, miscounted, remote, misplaced images; videos refused), `data convert` of
OpenAI image parts (data URLs written out as files) and of LLaMA-Factory's mllm_demo shape, the
dataset entry and media_dir, the tokenizing LLaMA-Factory keeps for itself.

Fast tier (Pillow draws the images), except the model-tier tests at the end: the token count and
the placeholder expansion equal LLaMA-Factory's Qwen2-VL plugin with transformers' image processor,
LLaMA-Factory's converter finds the images through media_dir, and `data check --model` refuses a
sample that cutoff_len cuts inside its image tokens."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

from qwenft.data.check import check_file, file_has_images, format_report
from qwenft.data.convert import convert_file
from qwenft.data.images import (
    ImageTokens,
    VisionProcessor,
    expand_placeholders,
    image_token_counts,
    image_tokens,
    lf_image_size,
    media_dir,
    smart_resize,
)
from qwenft.data.kinds import detect_file_kind
from qwenft.data.pipeline import DataSpec, data_not_reproduced
from qwenft.data.prepare import cache_state, tokenize_ahead
from qwenft.data.registry import dataset_entry, register_dataset
from qwenft.errors import QwenftError
from tests.helpers.builders import lines, table, write
from tests.helpers.cli import invoke_data as invoke

A = {"role": "assistant", "content": "A red square."}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def image_row(text: str, *images: str, answer: dict = A) -> dict:
    return {"messages": [user(text), answer], "images": list(images)}


def png(path: Path, size: tuple[int, int], color: tuple[int, int, int] = (200, 0, 0)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def png_bytes(size: tuple[int, int], color: tuple[int, int, int] = (0, 0, 200)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# --------------------------------------------------------------------------------------------------
# the token count: LLaMA-Factory's resizing, then Qwen2-VL's smart_resize


SIZES = [
    # (id, width, height, image_max_pixels, tokens): worked by hand from LLaMA-Factory 0.9.5's
    # _preprocess_image and transformers' smart_resize (patch 14, merge 2: 28 pixels a token side)
    ("56x56", 56, 56, 768 * 768, 4),  # 2x2 tokens, no resizing
    # 1000x800 > 768*768: scaled to 858x686, rounded to 868x672 (24.5 rounds to 24: half to even)
    ("1000x800", 1000, 800, 768 * 768, 744),
    ("1000x800_512", 1000, 800, 512 * 512, 320),  # 572x457 -> 560x448: 40*32/4
    ("4000x3000", 4000, 3000, 768 * 768, 768),  # 886x665 -> 896x672
    ("20x20", 20, 20, 768 * 768, 4),  # raised to 32x32 (image_min_pixels), then 56x56
    ("3x900", 3, 900, 768 * 768, 32),  # sides of at least 28: 28x900 -> 28x896 -> 56x... min
]


@table("case_id,width,height,max_pixels,tokens", SIZES)
def test_tokens_per_image(case_id, width, height, max_pixels, tokens) -> None:
    assert image_tokens(width, height, max_pixels) == tokens


def test_the_steps_of_the_count() -> None:
    assert smart_resize(56, 56) == (56, 56)
    assert smart_resize(686, 858) == (672, 868)
    assert lf_image_size(1000, 800, 768 * 768, 32 * 32) == (858, 686)
    assert lf_image_size(20, 20, 768 * 768, 32 * 32) == (32, 32)
    assert lf_image_size(3, 900, 768 * 768, 32 * 32) == (28, 900)
    # Qwen3-VL: 16-pixel patches (32 a token side) and its own 256x256 floor
    qwen3 = VisionProcessor(patch_size=16, merge_size=2, min_pixels=65536, max_pixels=16777216)
    assert qwen3.factor == 32
    assert image_tokens(56, 56, processor=qwen3) == 64  # raised to 256x256: 16x16 patches / 4


def test_the_image_processor_is_read_from_the_model_folder(tmp_path: Path) -> None:
    assert VisionProcessor.from_model(tmp_path) == VisionProcessor()  # a text model: defaults
    assert VisionProcessor.from_model("Qwen/not-downloaded") == VisionProcessor()
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "patch_size": 16,
                "merge_size": 2,
                "size": {"shortest_edge": 65536, "longest_edge": 16777216},
            }
        )
    )
    found = VisionProcessor.from_model(tmp_path)
    assert (found.patch_size, found.min_pixels, found.max_pixels) == (16, 65536, 16777216)
    assert found.source.endswith("preprocessor_config.json")
    # Qwen2-VL's own file: min_pixels and max_pixels at the top, over size
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2})
    )
    assert VisionProcessor.from_model(tmp_path).max_pixels == 12845056


def test_row_counts_and_expansion(tmp_path: Path) -> None:
    png(tmp_path / "a.png", (56, 56))
    png(tmp_path / "sub" / "b.png", (1000, 800))
    row = image_row("<image> and <image>: the same?", "a.png", str(tmp_path / "sub" / "b.png"))
    assert image_token_counts(row, tmp_path) == [4, 744]
    assert image_token_counts(row, tmp_path, max_pixels=512 * 512) == [4, 320]
    out = expand_placeholders(row, [4, 2])
    text = out["messages"][0]["content"]
    assert text == (
        "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|> and <|vision_start|>"
        "<|image_pad|><|image_pad|><|vision_end|>: the same?"
    )
    assert row["messages"][0]["content"].startswith("<image>")  # the row itself is left alone
    with pytest.raises(QwenftError, match="more images"):
        expand_placeholders(row, [4, 2, 1])
    with pytest.raises(QwenftError, match="below"):  # as LLaMA-Factory refuses it
        ImageTokens(max_pixels=100, min_pixels=1000)


# --------------------------------------------------------------------------------------------------
# data check


@pytest.fixture
def pictures(tmp_path: Path) -> Path:
    """A data folder with a small and a large picture and a corrupt PNG."""
    folder = tmp_path / "data"
    png(folder / "img" / "red.png", (56, 56))
    png(folder / "img" / "big.png", (1000, 800), (0, 200, 0))
    good = (folder / "img" / "red.png").read_bytes()
    (folder / "img" / "broken.png").write_bytes(good[:60] + b"\0" * 40 + good[100:])
    return folder


CHECK_CASES = [
    # (id, row, error kind, field, words of the message)
    ("missing", image_row("<image>What?", "img/nope.png"), "image_missing", "images[0]", "does not exist"),
    ("corrupt_png", image_row("<image>What?", "img/broken.png"), "image_unreadable", "images[0]", "cannot be decoded"),
    ("two_for_one", image_row("<image>Both?", "img/red.png", "img/big.png"), "image_count", "images", "1 <image> placeholder in the user turns but 2 images"),
    ("none_placed", image_row("What?", "img/red.png"), "image_count", "images", "0 <image> placeholders"),
    ("remote", image_row("<image>What?", "https://example.com/cat.png"), "remote_image", "images[0]", "download the images first"),
    ("data_url", image_row("<image>What?", "data:image/png;base64,AAAA"), "image_url", "images[0]", "qwenft data convert"),
    ("file_url", image_row("<image>What?", "file:///tmp/cat.png"), "image_url", "images[0]", "give the path"),
    ("in_answer", image_row("What?", "img/red.png", answer={"role": "assistant", "content": "<image>"}), "image_placeholder_role", "messages[1].content", "train the image's tokens"),
    ("in_system", {"messages": [{"role": "system", "content": "<image>"}, user("<image>Hi"), A], "images": ["img/red.png"]}, "image_placeholder_role", "messages[0].content", "system prompt"),
    ("not_a_list", {"messages": [user("<image>Hi"), A], "images": "img/red.png"}, "bad_images", "images", "list of paths"),
    ("video", {"messages": [user("<video>Hi"), A], "videos": ["v.mp4"]}, "multimodal", "videos", "not supported yet"),
    ("audio", {"messages": [user("Hi"), A], "audios": ["a.wav"]}, "multimodal", "audios", "not supported yet"),
]  # fmt: skip


@table("case_id,row,kind,field,words", CHECK_CASES)
def test_check_refuses_with_the_line(pictures: Path, data_app, case_id, row, kind, field, words):
    good = image_row("<image>What colour?", "img/red.png")
    path = write(pictures, lines(good, row), "chat.jsonl")
    report = check_file(path)
    found = [p for p in report.problems if p.kind == kind]
    assert found, format_report(report)
    assert (found[0].severity, found[0].line, found[0].field) == ("error", 2, field)
    assert words in found[0].message, found[0].message
    result = invoke(data_app, "check", path)
    assert result.exit_code == 2 and f"{path}:2 {field}" in result.output, result.output


def test_check_reports_sizes_and_tokens(pictures: Path, data_app, monkeypatch) -> None:
    rows = [
        image_row("<image>What colour?", "img/red.png"),
        image_row("Compare <image> with <image>.", "img/red.png", "img/big.png"),
        {"messages": [user("No picture here."), A]},  # text rows mix with image rows
        image_row("<image>Again?", str(pictures / "img" / "big.png")),  # an absolute path
        {"messages": [user("Hi"), A], "images": []},  # an empty list: a text row
    ]
    path = write(pictures, lines(*rows), "chat.jsonl")
    monkeypatch.chdir(pictures.parent)  # paths are relative to the file, not to the working folder
    report = check_file(path)
    assert report.ok and report.n_valid == 5 and report.has_images, format_report(report)
    assert report.kind == "sft" and detect_file_kind(path) == "sft"
    stats = report.images.to_dict()
    assert stats["n_rows"] == 3 and stats["n_images"] == 4
    assert stats["smallest"] == [56, 56] and stats["largest"] == [1000, 800]
    assert (stats["min_tokens"], stats["max_tokens"], stats["tokens"]) == (4, 744, 1496)
    result = invoke(data_app, "check", path)
    assert result.exit_code == 0, result.output
    assert "images: 4 in 3 rows, 56x56 to 1000x800, 4 to 744 tokens each" in result.output
    assert "image_max_pixels 589824" in result.output
    result = invoke(data_app, "check", path, "--image-max-pixels", str(512 * 512), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"]["max_tokens"] == 320
    # a file whose placeholders are text (no images anywhere): a warning, not an error
    text = write(pictures, lines({"messages": [user("Write an <image> tag"), A]}), "text.jsonl")
    report = check_file(text)
    assert report.ok and not report.has_images and report.images is None
    assert [p.kind for p in report.problems] == ["placeholder_without_image"]


def test_check_pixel_options_are_checked(pictures: Path, data_app) -> None:
    path = write(pictures, lines(image_row("<image>?", "img/red.png")), "chat.jsonl")
    result = invoke(data_app, "check", path, "--image-max-pixels", "0")
    assert result.exit_code == 2 and "--image-max-pixels" in result.output
    result = invoke(
        data_app, "check", path, "--image-max-pixels", "100", "--image-min-pixels", "1000"
    )
    assert result.exit_code == 2 and "below image_min_pixels" in result.output


def test_each_file_is_read_once(pictures: Path, monkeypatch) -> None:
    from qwenft.data import images

    seen = []
    verify = images.verify_image
    monkeypatch.setattr(images, "verify_image", lambda p: seen.append(p) or verify(p))
    rows = [image_row("<image>?", "img/red.png")] * 3 + [image_row("<image>?", "img/big.png")]
    report = check_file(write(pictures, lines(*rows), "chat.jsonl"))
    assert report.images.n_images == 4 and len(seen) == 2


def test_images_are_sft_data_only(pictures: Path, data_app) -> None:
    """Image rows are sft data (train with --stage sft); multimodal pairs, KTO and pt are refused
    with the reason, by check and by convert."""
    image = ["img/red.png"]
    rows = {
        "preference": {"messages": [user("<image>Hi")], "chosen": A, "rejected": {**A, "content": "No."}},
        "kto": {"messages": [user("<image>Hi"), A], "label": True},
        "pt": {"text": "<image> text"},
    }  # fmt: skip
    for kind, row in rows.items():
        path = write(pictures, lines({**row, "images": image}), f"{kind}.jsonl")
        report = check_file(path)
        assert report.kind == kind and not report.ok
        (problem,) = [p for p in report.problems if p.severity == "error"]
        assert problem.kind == "multimodal" and f"multimodal {kind} data" in problem.message
        assert "--stage sft only" in problem.message
        out = convert_file(path, pictures / f"{kind}-out.jsonl")
        assert not out.written and out.problems[0].kind == "multimodal", out.problems
    sft = write(pictures, lines(image_row("<image>?", *image)), "sft.jsonl")
    report = check_file(sft, "preference")  # train --stage dpo on it: the wrong kind
    assert [p.kind for p in report.problems] == ["wrong_kind"]


def test_copies_elsewhere_still_find_the_images(pictures: Path, tmp_path: Path) -> None:
    """`data split --out-dir` and the filtered copy of --overlength drop (in the run folder) make
    relative image paths absolute; beside the data they stay as written."""
    from qwenft.data.split import split_file, write_without_lines

    rows = [
        image_row("<image>Red?", "img/red.png"),
        image_row("<image>Big?", "img/big.png"),
        {"messages": [user("Hi"), A]},
        image_row("<image>Again?", str(pictures / "img" / "red.png")),
    ]
    path = write(pictures, lines(*rows), "chat.jsonl")
    for out in split_file(path, 0.5, out_dir=tmp_path / "split"):
        report = check_file(out)
        assert report.ok and report.images is not None, format_report(report)
    got = [
        json.loads(x) for x in (tmp_path / "split" / "chat.train.jsonl").read_text().splitlines()
    ]
    got += [json.loads(x) for x in (tmp_path / "split" / "chat.val.jsonl").read_text().splitlines()]
    paths = sorted(p for row in got for p in row.get("images", []))
    assert paths == sorted([str(pictures / "img" / n) for n in ("big.png", "red.png", "red.png")])
    beside = split_file(path, 0.5)
    text = beside[0].read_text() + beside[1].read_text()
    assert '"img/red.png"' in text and '"img/big.png"' in text
    kept, dropped = write_without_lines(path, tmp_path / "run" / "filtered.jsonl", [2])
    assert (kept, dropped) == (3, 1)
    assert check_file(tmp_path / "run" / "filtered.jsonl").ok


# --------------------------------------------------------------------------------------------------
# data convert


def openai_row(*parts: dict, answer: str = "Blue.") -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Describe images."},
            {"role": "user", "content": list(parts)},
            {"role": "assistant", "content": answer},
        ]
    }


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image_url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url, "detail": "low"}}


def test_convert_openai_image_parts(tmp_path: Path, data_app) -> None:
    blue, green = png_bytes((64, 48)), png_bytes((30, 40), (0, 200, 0))
    local = png(tmp_path / "pics" / "red.png", (56, 56))
    rows = [
        openai_row(text("What is "), image_url(data_url(blue)), text(" this?")),
        openai_row(image_url(data_url(green)), image_url(f"file://{local}"), text("Both?")),
        openai_row({"type": "input_image", "image_url": "pics/red.png"}, text("And?")),
    ]
    src = write(tmp_path, lines(*rows), "openai.jsonl")
    out = tmp_path / "out" / "chat.jsonl"
    report = convert_file(src, out)
    assert report.written and report.n_out == 3, report.problems
    assert (report.n_images, report.images_written) == (4, 2)
    assert report.images_dir == out.parent / "chat_images"
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got[0]["messages"][1] == user("What is <image> this?")
    assert got[0]["images"] == ["chat_images/1-0.png"]
    assert got[1]["messages"][1] == user("<image><image>Both?")
    assert got[1]["images"] == ["chat_images/2-0.png", str(local)]  # a file URL: its path
    assert got[2]["images"] == [str(local)]  # relative to the source's folder: made absolute
    assert (out.parent / "chat_images" / "1-0.png").read_bytes() == blue
    assert (out.parent / "chat_images" / "2-0.png").read_bytes() == green
    check = check_file(out)
    assert check.ok and check.images.n_images == 4, format_report(check)
    # again with --force: the same images are there already and are kept
    result = invoke(data_app, "convert", src, "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert "4 in the rows written" in result.output
    # an image of other content at a name it would write: never overwritten, nothing written
    (out.parent / "chat_images" / "1-0.png").write_bytes(green)
    report = convert_file(src, out, force=True)
    assert not report.written and report.problems[0].kind == "image_exists"
    assert (out.parent / "chat_images" / "1-0.png").read_bytes() == green


CONVERT_REFUSALS = [
    # (id, row, error kind, words)
    ("remote", openai_row(image_url("https://example.com/a.png")), "remote_image", "download the images first"),
    ("other_host", openai_row(image_url("file://server/a.png")), "remote_image", "another host"),
    ("not_an_image", openai_row(image_url("data:text/plain;base64,aGk=")), "image_url", "not an image"),
    ("bad_base64", openai_row(image_url("data:image/png;base64,@@@")), "image_url", "does not decode"),
    ("in_answer", {"messages": [user("Hi"), {"role": "assistant", "content": [image_url("a.png")]}]}, "image_placeholder_role", "images go in user turns"),
    ("audio", openai_row({"type": "input_audio", "input_audio": {"data": "x"}}), "multimodal", "not supported yet"),
    ("both_ways", {**openai_row(image_url("a.png")), "images": ["b.png"]}, "image_count", "ambiguous"),
    ("no_file", openai_row(image_url("missing.png")), "image_missing", "does not exist"),
]  # fmt: skip


@table("case_id,row,kind,words", CONVERT_REFUSALS)
def test_convert_refuses_images_with_the_reason(tmp_path: Path, case_id, row, kind, words):
    good = openai_row(text("What?"), image_url(data_url(png_bytes((28, 28)))))
    src = write(tmp_path, lines(good, row), "src.jsonl")
    out = tmp_path / "out.jsonl"
    report = convert_file(src, out)
    assert not report.written and not out.exists()
    assert not (tmp_path / "out_images").exists()  # the good row's image is not left behind
    errors = [p for p in report.problems if p.severity == "error"]
    assert (errors[0].kind, errors[0].line) == (kind, 2), errors
    assert words in errors[0].message, errors[0].message
    report = convert_file(src, out, skip_invalid=True)  # the others are written, with their images
    assert report.written and report.n_out == 1 and report.images_written == 1
    assert sorted(p.name for p in (tmp_path / "out_images").iterdir()) == ["1-0.png"]


def test_convert_llamafactory_mllm_demo(tmp_path: Path) -> None:
    """LLaMA-Factory's mllm_demo.json (messages with <image> and an images list) is qwenft's shape:
    kept as it is beside the source, made absolute when written elsewhere; its sharegpt form too."""
    png(tmp_path / "mllm_demo_data" / "1.jpg", (120, 80))
    png(tmp_path / "mllm_demo_data" / "2.jpg", (80, 120))
    demo = [
        {
            "messages": [
                user("<image>Who are they?"),
                {"role": "assistant", "content": "They're Kane and Gretzka from Bayern Munich."},
                user("What are they doing?<image>"),
                {"role": "assistant", "content": "They are celebrating on the soccer field."},
            ],
            "images": ["mllm_demo_data/1.jpg", "mllm_demo_data/2.jpg"],
        },
        {
            "conversations": [
                {"from": "human", "value": "<image>Who is he?"},
                {"from": "gpt", "value": "He's Thomas Muller."},
            ],
            "images": ["mllm_demo_data/1.jpg"],
        },
    ]
    src = tmp_path / "mllm_demo.json"
    src.write_text(json.dumps(demo[:1], indent=2))
    out = tmp_path / "chat.jsonl"
    report = convert_file(src, out)
    assert report.written and report.kind == "sft" and report.images_written == 0
    row = json.loads(out.read_text())
    assert row == demo[0]
    elsewhere = tmp_path / "other" / "chat.jsonl"
    convert_file(src, elsewhere)
    assert json.loads(elsewhere.read_text())["images"][0] == str(
        tmp_path / "mllm_demo_data" / "1.jpg"
    )
    assert check_file(elsewhere).ok
    sharegpt = write(tmp_path, lines(demo[1]), "sharegpt.jsonl")
    report = convert_file(sharegpt, tmp_path / "sg.jsonl")
    assert report.written and report.format == "sharegpt"
    assert json.loads((tmp_path / "sg.jsonl").read_text()) == {
        "messages": [
            user("<image>Who is he?"),
            {"role": "assistant", "content": "He's Thomas Muller."},
        ],
        "images": ["mllm_demo_data/1.jpg"],
    }


# --------------------------------------------------------------------------------------------------
# registration, and who tokenizes


def test_register_maps_images_and_names_media_dir(pictures: Path, data_app) -> None:
    path = write(
        pictures,
        lines(image_row("<image>?", "img/red.png"), {"messages": [user("Hi"), A]}),
        "chat.jsonl",
    )
    assert file_has_images(path)
    entry = register_dataset(path, "pics", pictures / "registry")
    assert entry["formatting"] == "sharegpt"
    assert entry["columns"] == {"messages": "messages", "images": "images"}
    assert entry["tags"]["role_tag"] == "role" and entry["tags"]["user_tag"] == "user"
    assert "images" not in dataset_entry(path, kind="sft")["columns"]
    text = write(pictures, lines({"messages": [user("Hi"), A], "images": []}), "text.jsonl")
    assert not file_has_images(text)
    assert "images" not in register_dataset(text, "text", pictures / "registry")["columns"]
    result = invoke(
        data_app, "register", path, "--name", "pics2", "--dataset-dir", pictures / "reg2"
    )
    assert result.exit_code == 0, result.output
    assert f"media_dir: {pictures}" in result.output
    assert media_dir(path) == str(pictures)
    result = invoke(
        data_app, "register", path, "--name", "pics3", "--dataset-dir", pictures / "reg3", "--json"
    )
    assert json.loads(result.stdout)["media_dir"] == str(pictures)


def test_llamafactory_tokenizes_image_data(pictures: Path) -> None:
    path = write(pictures, lines(image_row("<image>?", "img/red.png")), "chat.jsonl")
    text = write(pictures, lines({"messages": [user("Hi"), A]}), "text.jsonl")
    assert "LLaMA-Factory tokenizes image rows itself" in data_not_reproduced(path)
    assert data_not_reproduced(text) is None
    spec = DataSpec(template="qwen", cutoff_len=64, tokenized_path=pictures / "tokenized")
    assert spec.for_data(path).lf_tokenizes and not spec.for_data(text).lf_tokenizes
    assert cache_state(spec, path).by == "llamafactory" and cache_state(spec, text).by == "qwenft"
    said = []
    assert tokenize_ahead(spec, path, "no-model-needed", said.append) is None
    assert said == [
        "LLaMA-Factory will tokenize the data itself: the data has images: LLaMA-Factory "
        "tokenizes image rows itself (its vision processor reads every image and expands each "
        "<image> into that image's tokens)"
    ]
    assert not (pictures / "tokenized").exists()
    # train.yaml's image settings and media_dir reach the spec
    config = {"template": "qwen", "cutoff_len": 64, "image_max_pixels": 262144, "media_dir": "/d"}
    spec = DataSpec.from_config(config)
    assert (spec.image_max_pixels, spec.image_min_pixels, spec.media_dir) == (262144, 1024, "/d")


# --------------------------------------------------------------------------------------------------
# model tier: against LLaMA-Factory's own code


def _lf_processor(max_pixels: int, min_pixels: int, **image_processor) -> object:
    """What LLaMA-Factory's Qwen2VLPlugin reads of a processor: transformers' Qwen2-VL image
    processor (its Pillow backend) and LLaMA-Factory's image_max_pixels / image_min_pixels."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    class Processor:
        pass

    processor = Processor()
    processor.image_processor = Qwen2VLImageProcessorPil(**image_processor)
    processor.video_processor = processor.image_processor
    processor.image_max_pixels, processor.image_min_pixels = max_pixels, min_pixels
    return processor


def test_counts_and_expansion_equal_llamafactory(tmp_path: Path, vocab_file: Path) -> None:
    from llamafactory.data.mm_plugin import get_mm_plugin

    plugin = get_mm_plugin(
        name="qwen2_vl", image_token="<|image_pad|>", video_token="<|video_pad|>"
    )
    sizes = [(56, 56), (1000, 800), (4000, 3000), (20, 20), (3, 900), (900, 3), (333, 777),
             (1, 1), (2048, 31), (640, 480), (1920, 1080), (27, 29)]  # fmt: skip
    paths = [str(png(tmp_path / f"{w}x{h}.png", (w, h))) for w, h in sizes]
    row = {
        "messages": [user("".join(f"<image>{k} " for k in range(len(paths)))), A],
        "images": paths,
    }
    qwen3 = {"patch_size": 16, "size": {"shortest_edge": 65536, "longest_edge": 16777216}}
    for max_pixels, min_pixels, config in (
        (768 * 768, 32 * 32, {}),
        (256 * 256, 64 * 64, {}),
        (1024 * 1024, 32 * 32, qwen3),
    ):
        folder = tmp_path / f"model-{max_pixels}"
        folder.mkdir()
        if config:
            (folder / "preprocessor_config.json").write_text(json.dumps(config))
        ours = ImageTokens(max_pixels, min_pixels, VisionProcessor.from_model(folder))
        theirs = plugin.process_messages(
            row["messages"], paths, [], [], _lf_processor(max_pixels, min_pixels, **config)
        )
        assert ours.expand(row, tmp_path)["messages"] == theirs, (max_pixels, config)


def test_llamafactory_finds_the_images_through_media_dir(
    tmp_path: Path, pictures: Path, vocab_file: Path, monkeypatch
) -> None:
    """The entry qwenft registers, read by LLaMA-Factory's parser and converter: with media_dir
    set to the data file's folder every image is found; with its default (dataset_dir) it is not."""
    from llamafactory.data.converter import get_dataset_converter
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.hparams import DataArguments

    rows = [image_row("<image>What?", "img/red.png"), image_row("<image>Big?", "img/big.png")]
    path = write(pictures, lines(*rows), "chat.jsonl")
    registry = tmp_path / "registry"
    register_dataset(path, "pics", registry)
    (attr,) = get_dataset_list(["pics"], str(registry))
    assert attr.images == "images" and attr.formatting == "sharegpt"
    monkeypatch.chdir(tmp_path)  # not the data folder
    for where, found in ((media_dir(path), True), (None, False)):
        args = DataArguments(dataset_dir=str(registry), media_dir=where)
        convert = get_dataset_converter(attr.formatting, attr, args)
        for row in rows:
            images = convert(row)["_images"]
            assert all(Path(p).is_file() for p in images) is found, (where, images)


def test_check_with_a_model_refuses_an_image_cut_by_cutoff_len(
    pictures: Path, tiny_home: Path, data_app
) -> None:
    long_answer = {"role": "assistant", "content": "word " * 600}
    rows = [
        image_row("<image>Small?", "img/red.png"),  # 4 image tokens: fits
        image_row("<image>Big?", "img/big.png"),  # 744 image tokens: cut at 512
        {"messages": [user("Hi"), long_answer]},  # text over cutoff_len: a warning only
        image_row("<image>Small, long answer?", "img/red.png", answer=long_answer),  # answer cut
    ]
    path = write(pictures, lines(*rows), "chat.jsonl")
    result = invoke(data_app, "check", path, "--cutoff-len", "512")
    assert result.exit_code == 2, result.output
    assert f"{path}:2 images: cutoff_len 512 cuts this sample" in result.output
    assert "Image features and image tokens do not match" in result.output
    assert "cutoff_len 832 keeps it whole" in result.output
    assert "over cutoff_len: 3 samples (lines 2, 3, 4)" in result.output
    assert "has no image processor" in result.output  # tiny-qwen2 is a text model
    result = invoke(data_app, "check", path, "--cutoff-len", "512", "--json")
    data = json.loads(result.stdout)
    assert data["counts"]["image_cut"] == 1 and data["n_valid"] == 3
    assert data["images"]["n_images"] == 3 and data["images"]["max_tokens"] == 744
    assert data["tokens"]["length"]["max"] > 744  # the image tokens are counted
    result = invoke(data_app, "check", path, "--cutoff-len", "832")
    assert result.exit_code == 0, result.output
    result = invoke(data_app, "check", path, "--cutoff-len", "512", "--image-max-pixels", "200000")
    assert result.exit_code == 0, result.output  # smaller images fit


def test_image_samples_equal_llamafactory_on_a_vision_model(
    pictures: Path, tmp_path: Path, tiny_home: Path
) -> None:
    """On the tiny Qwen2-VL (qwen2_vl template, its own image processor), qwenft's measure of
    image samples (<image> expanded, then LLaMA-Factory's template and truncation) equals the
    tokenized rows LLaMA-Factory's get_dataset writes, whole and cut by cutoff_len; the sample it
    cuts inside its image tokens is the one measure_images refuses. Text data on the vision
    templates is tokenized before launch by qwenft, and equals LLaMA-Factory's dataset too."""
    from qwenft.data.pipeline import measure_images
    from qwenft.data.prepare import write_tokenized
    from qwenft.errors import QwenftError as Error
    from qwenft.models.tiny import ensure_tiny_model
    from tests.helpers.lf_reference import lf_rows, lf_tokenized, load_splits

    try:
        model_dir = ensure_tiny_model("tiny-qwen2-vl", progress=None)
    except (Error, KeyError) as exc:  # pragma: no cover - the vision preset is another change's
        pytest.skip(f"no tiny-qwen2-vl preset: {exc}")
    rows = [
        image_row("<image>Who?", "img/red.png"),
        {"messages": [user("No picture."), A]},
        image_row("Compare <image> and <image>.", "img/big.png", "img/red.png"),
        {
            "messages": [user("<image>One"), A, user("and <image> two?"), A],
            "images": ["img/red.png", "img/big.png"],
        },
    ]
    path = write(pictures, lines(*rows), "chat.jsonl")
    for cutoff in (4096, 64):
        config = {
            "stage": "sft",
            "template": "qwen2_vl",
            "cutoff_len": cutoff,
            "media_dir": media_dir(path),
            "preprocessing_num_workers": 1,
        }
        theirs = lf_rows(path, model_dir, config, tmp_path / f"lf-{cutoff}")
        spec = DataSpec.from_config(config)
        ours = spec.encoder(str(model_dir)).encode_sides(rows)
        assert [(r["input_ids"], r["labels"]) for r in theirs] == [
            (s[0][1], s[0][2]) for s in ours
        ], cutoff
        measured = measure_images(path, spec, model_dir)
        counter = spec.image_tokens(model_dir)
        assert counter.processor.source  # the model's own preprocessor_config.json
        assert measured.stats.n_images == 5 and measured.stats.settings == counter.describe()
        cut = [p.line for p in measured.problems]
        pad = 151655  # <|image_pad|>
        lost = [
            k + 1
            for k, (r, row) in enumerate(zip(theirs, rows, strict=True))
            if r["input_ids"].count(pad) < sum(counter.counts(row, pictures))
        ]
        assert cut == lost and (cut == [] if cutoff == 4096 else 3 in cut), (cutoff, cut)
    text = [{"messages": [user(f"q{i} " * (i + 1)), {**A, "content": f"a{i}"}]} for i in range(12)]
    data = write(pictures, lines(*text), "text.jsonl")
    for template in ("qwen2_vl", "qwen3_vl"):
        config = {"stage": "sft", "template": template, "cutoff_len": 16, "val_size": 0.25}
        lf_tokenized(data, model_dir, config, tmp_path / f"lf-{template}", tmp_path / template)
        write_tokenized(data, model_dir, config, tmp_path / f"ours-{template}")
        theirs = load_splits(tmp_path / f"lf-{template}")
        assert load_splits(tmp_path / f"ours-{template}") == theirs, template
