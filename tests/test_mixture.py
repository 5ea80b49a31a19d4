"""Several --data files in one run, and --eval-data (qwenft.data.mixture, issue 28): the rules
checked before anything is written, the shares each source is expected to take, what train.yaml
says, and a run recorded with every source (through the recording llamafactory-cli). The real
LLaMA-Factory mixing them is test_e2e_mixture.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qwenft.choices import Mix
from qwenft.data.mixture import (
    Mixture,
    Source,
    check_split,
    expected_samples,
    mixture_of,
    source_lines,
    token_shares,
)
from qwenft.errors import QwenftError
from tests.helpers.builders import chat_rows, read_calls, run_manifest, write_jsonl, written
from tests.helpers.cli import invoke


def test_a_source_is_a_file_and_maybe_a_share(tmp_path: Path) -> None:
    assert Source.parse("a.jsonl") == Source(Path("a.jsonl"))
    assert Source.parse("a.jsonl:0.8") == Source(Path("a.jsonl"), 0.8)
    assert Source.parse("data/b.jsonl:.25") == Source(Path("data/b.jsonl"), 0.25)
    assert Source.parse("c:notanumber.jsonl") == Source(Path("c:notanumber.jsonl"))
    odd = tmp_path / "odd.jsonl:0.5"  # a file named so is taken whole
    odd.write_text("")
    assert Source.parse(str(odd)) == Source(odd)


def test_shares_render_as_interleave_probs() -> None:
    m = mixture_of(["a.jsonl:0.8", "b.jsonl:0.2"])
    assert m.mix == Mix.INTERLEAVE and m.shares == (0.8, 0.2)
    assert m.lf_keys() == {"mix_strategy": "interleave_under", "interleave_probs": "0.8,0.2"}
    m = mixture_of(["a.jsonl", "b.jsonl"])
    assert m.mix == Mix.CONCAT and m.lf_keys() == {"mix_strategy": "concat"}
    m = mixture_of(["a.jsonl", "b.jsonl"], "interleave-over", ["e.jsonl"])
    assert m.lf_keys(["e-1"]) == {
        "mix_strategy": "interleave_over",
        "eval_dataset": "e-1",
        "val_size": 0.0,
    }
    assert mixture_of(["a.jsonl"]).lf_keys() == {}  # one file: a plain run


@pytest.mark.parametrize(
    ("data", "mix", "evals", "message", "hint"),
    [
        (["a:0.8", "b:0.5"], None, [], "the shares add up to 1.3, not 1", "a:0.615 --data b:0.385"),
        (["a:0.8", "b"], None, [], "b has no share", "give every file a share"),
        (["a:0.5"], None, [], "needs two or more --data files", "--data a"),
        (["a:1.5", "b:-0.5"], None, [], "must be in (0, 1]", None),
        (["a:0.5", "b:0.5"], "concat", [], "shares need --mix interleave", None),
        (["a", "a"], None, [], "a is given twice", "give each file once"),
        (["a", "b"], None, ["a"], "a is given as --data and as --eval-data", "held out"),
        (["a:0.5", "b:0.5"], None, ["e"], "needs 2 --eval-data files", "one --eval-data"),
        (["a"], "blend", [], "unknown --mix 'blend'", "concat, interleave, interleave-over"),
    ],
)
def test_bad_mixtures_are_refused_with_the_reason(
    data: list[str], mix: str | None, evals: list[str], message: str, hint: str | None
) -> None:
    with pytest.raises(QwenftError) as caught:
        mixture_of(data, mix, evals)
    assert message in caught.value.message
    if hint:
        assert hint in (caught.value.hint or "")


def test_every_problem_is_said_at_once() -> None:
    with pytest.raises(QwenftError) as caught:
        mixture_of(["a:0.7", "a:0.7"], "concat")
    text = caught.value.message
    assert "3 problems" in text and "twice" in text and "1.4" in text and "concat" in text


def test_eval_data_excludes_a_held_out_split() -> None:
    with pytest.raises(QwenftError, match="exclude each other"):
        check_split(mixture_of(["a"], None, ["e"]), 0.1)
    check_split(mixture_of(["a"], None, ["e"]), 0.0)
    check_split(mixture_of(["a"]), 0.1)


def test_expected_samples_follow_each_strategy() -> None:
    rows = [100, 10]
    assert expected_samples(rows, Mix.CONCAT, None) == [100, 10]
    assert expected_samples(rows, Mix.CONCAT, None, max_samples=20) == [20, 10]  # per file
    # round-robin until the first runs out, or until every one has
    assert expected_samples(rows, Mix.INTERLEAVE, None) == [10, 10]
    assert expected_samples(rows, Mix.INTERLEAVE_OVER, None) == [100, 100]
    # at 0.8/0.2 the small file (10 / 0.2 = 50 draws) runs out first: 40 and 10
    assert expected_samples(rows, Mix.INTERLEAVE, [0.8, 0.2]) == pytest.approx([40, 10])
    # over: on until the large one is read (100 / 0.8 = 125 draws), the small one repeated
    assert expected_samples(rows, Mix.INTERLEAVE_OVER, [0.8, 0.2]) == pytest.approx([100, 25])


def test_token_shares_weigh_samples_by_their_length() -> None:
    # equal samples, the second file's rows three times as long: 25 % / 75 % of the tokens
    assert token_shares([10, 10], [100, 300], [10, 10]) == pytest.approx([0.25, 0.75])
    lines = source_lines(["a.jsonl", "b.jsonl"], [100, 10], [40.0, 10.0], [4000, 2000])
    assert (
        lines[0]
        == "source a.jsonl: 40 samples of 100 rows, 4,000 tokens, ~44% of the training tokens"
    )
    assert lines[1].startswith("source b.jsonl: 10 samples (every row), 2,000 tokens, ~56%")


def test_the_manifest_records_every_source() -> None:
    from qwenft.runs.manifest import DatasetRecord, Manifest

    rec = DatasetRecord(path="/d/b.jsonl", sha256="b" * 64, name="b-1", dataset_dir="/d", share=0.2)
    held = DatasetRecord(path="/d/held.jsonl", sha256="c" * 64, name="held-1", dataset_dir="/d")
    first = DatasetRecord(
        path="/d/a.jsonl", sha256="a" * 64, name="a-1", dataset_dir="/d", share=0.8
    )
    m = run_manifest(dataset=first, sources=[rec], mix="interleave", eval_data=[held])
    again = Manifest.from_dict(json.loads(m.to_json()))
    assert again.sources == [rec] and again.eval_data == [held] and again.mix == "interleave"
    assert again.data_line() == "a.jsonl 80% + b.jsonl 20% (interleave); eval held.jsonl"
    # a plain run's manifest has no such keys
    assert {"sources", "mix", "eval_data"}.isdisjoint(json.loads(run_manifest().to_json()))


# --- through `qwenft train`, with the recording llamafactory-cli --------------------------------


@pytest.fixture
def stub_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each file's token statistics without a tokenizer (config-only model folders): its rows,
    20 tokens each."""
    from qwenft.data import reader
    from qwenft.data.pipeline import TokenStats

    def stats(path: Path, *args: object, **kwargs: object) -> TokenStats:
        n = sum(1 for _ in reader.open_data_file(Path(path))[1])
        return TokenStats(n_samples=n, tokens_total=20 * n, suggested_cutoff_len=64)

    monkeypatch.setattr(
        "qwenft.train.overlength_stats", lambda plan, progress: stats(plan.data_path)
    )
    monkeypatch.setattr("qwenft.train.tokenize_ahead", lambda *args: None)
    monkeypatch.setattr("qwenft.data.pipeline.file_stats", stats)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    rows = chat_rows()
    return {
        "general": write_jsonl(
            tmp_path / "general.jsonl",
            chat_rows([(f"Question {i}?", f"Answer {i}.") for i in range(16)]),
        ),
        "identity": write_jsonl(tmp_path / "identity.jsonl", rows),  # 4 rows
        "held": write_jsonl(tmp_path / "held.jsonl", rows[:2]),
        "held2": write_jsonl(tmp_path / "held2.jsonl", rows[2:]),
    }


@pytest.mark.usefixtures("stub_stats")
def test_a_mixture_with_eval_data_is_rendered_registered_and_recorded(
    fake_cli: Path, local_model: Path, files: dict[str, Path]
) -> None:
    result = invoke(
        "train", "--model", local_model, "-o", "runs/mix",
        "--data", f"{files['general']}:0.8", "--data", f"{files['identity']}:0.2",
        "--eval-data", files["held"], "--eval-data", files["held2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # each source's rows, tokens and expected share, said before launch (16 x 0.8 / 0.2 = ...:
    # identity runs out first at 4 / 0.2 = 20 draws, 16 of general)
    assert (
        "source general.jsonl: 16 samples (every row), 320 tokens, ~80% of the training tokens"
        in result.output
    )
    assert "source identity.jsonl: 4 samples (every row), 80 tokens, ~20%" in result.output
    (call,) = read_calls(fake_cli)
    cfg = call["yaml"]
    names = cfg["dataset"].split(",")
    assert len(names) == 2 and cfg["mix_strategy"] == "interleave_under"
    assert cfg["interleave_probs"] == "0.8,0.2"
    evals = cfg["eval_dataset"].split(",")
    assert len(evals) == 2 and cfg["val_size"] == 0.0 and cfg["eval_strategy"] == "steps"
    info = json.loads((Path(cfg["dataset_dir"]) / "dataset_info.json").read_text())
    assert [info[n]["file_name"] for n in names + evals] == [
        str(files[k].resolve()) for k in ("general", "identity", "held", "held2")
    ]
    manifest = json.loads(Path("runs/mix/qwenft.json").read_text())
    assert manifest["dataset"]["share"] == 0.8 and manifest["dataset"]["name"] == names[0]
    assert [s["name"] for s in manifest["sources"]] == names[1:]
    assert manifest["sources"][0]["share"] == 0.2 and manifest["sources"][0]["samples"] == 4
    assert [e["path"] for e in manifest["eval_data"]] == [
        str(files["held"].resolve()),
        str(files["held2"].resolve()),
    ]
    assert manifest["mix"] == "interleave"
    assert set(manifest["overlength"]["files"]) == {"general.jsonl", "identity.jsonl"}
    listed = invoke("runs", "runs/mix")
    assert (
        "data: general.jsonl 80% + identity.jsonl 20% (interleave); eval held.jsonl, held2.jsonl"
        in listed.output
    )


@pytest.mark.usefixtures("stub_stats")
def test_resume_refuses_when_any_source_changed(
    fake_cli: Path, local_model: Path, files: dict[str, Path]
) -> None:
    result = invoke(
        "train", "--model", local_model, "-o", "runs/mix", "--max-steps", "2",
        "--data", files["general"], "--data", files["identity"], "--eval-data", files["held"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    from qwenft.runs.manifest import update_manifest

    update_manifest(Path("runs/mix"), status="interrupted")
    with files["identity"].open("a") as fh:
        fh.write(files["held"].read_text())
    again = invoke("resume", "runs/mix")
    assert again.exit_code == 2, again.output
    assert "identity.jsonl changed" in again.output and "--force" in again.output
    files["held"].unlink()
    again = invoke("resume", "runs/mix")
    assert f"{files['held'].resolve()} is gone" in again.output


@pytest.mark.usefixtures("stub_stats")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{general}", "--data", "missing.jsonl"], "data file not found: missing.jsonl"),
        (["--data", "{general}:0.8", "--data", "{identity}:0.5"], "the shares add up to 1.3"),
        (["--data", "{general}", "--data", "{general}"], "general.jsonl is given twice"),
        (
            ["--data", "{general}", "--eval-data", "{held}", "--val-size", "0.1"],
            "exclude each other",
        ),
        (["--data", "{general}", "--data", "{pairs}"], "pairs.jsonl holds preference pairs"),
        (
            ["--data", "{general}", "--data", "{identity}", "--overlength", "drop"],
            "--overlength drop",
        ),
        (["--data", "{general}", "--eval-data", "{bad}"], "bad.jsonl has 2 data error(s)"),
    ],
)
def test_bad_mixtures_exit_2_and_write_nothing(
    fake_cli: Path,
    local_model: Path,
    files: dict[str, Path],
    tmp_path: Path,
    isolated: Path,
    args: list[str],
    message: str,
) -> None:
    pair = {
        "messages": [{"role": "user", "content": "hi"}],
        "chosen": {"role": "assistant", "content": "Hello!"},
        "rejected": {"role": "assistant", "content": "no"},
    }
    paths = {
        **{k: str(v) for k, v in files.items()},
        "pairs": str(write_jsonl(tmp_path / "pairs.jsonl", [pair])),
        "bad": str(write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user"}]}])),
    }
    before = written(Path.cwd(), isolated, tmp_path / "general.jsonl")
    result = invoke(
        "train", "--model", local_model, "-o", "runs/x", *[a.format(**paths) for a in args]
    )
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output
    assert written(Path.cwd(), isolated, tmp_path / "general.jsonl") == before
    assert read_calls(fake_cli) == []


def test_eval_defaults_to_the_runs_eval_data(tmp_path: Path) -> None:
    from qwenft.evaluate import run_eval_data
    from qwenft.runs.manifest import DatasetRecord

    run = tmp_path / "run"
    run.mkdir()
    held = DatasetRecord(path="/d/held.jsonl", sha256="c" * 64, name="h", dataset_dir="/d")
    (run / "qwenft.json").write_text(run_manifest(eval_data=[held]).to_json())
    assert run_eval_data(str(run)) == Path("/d/held.jsonl")
    (run / "qwenft.json").write_text(run_manifest().to_json())
    with pytest.raises(QwenftError, match="trained without --eval-data"):
        run_eval_data(str(run))


def test_data_check_reports_each_file_and_a_total(files: dict[str, Path]) -> None:
    result = invoke("data", "check", files["general"], files["identity"])
    assert result.exit_code == 0, result.output
    assert f"== {files['general']}" in result.output and f"== {files['identity']}" in result.output
    assert "== total: 2 files, 20 samples (20 valid), 0 error(s), 0 warning(s)" in result.output
    bad = files["held"].parent / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    result = invoke("data", "check", files["general"], bad, "--json")
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert [f["path"] for f in report["files"]] == [str(files["general"]), str(bad)]
    assert report["total"]["errors"] >= 1 and report["total"]["samples"] == 17


def test_the_yaml_keys_of_a_mixture_are_qwenfts_own() -> None:
    from qwenft.lf.render import TrainSpec, build_train_config

    spec = dict(method="lora", model_path="/m", template="qwen", default_system="",
                dataset="a", dataset_dir="/d", output_dir="/o")  # fmt: skip
    for key in ("eval_dataset", "mix_strategy", "interleave_probs"):
        with pytest.raises(QwenftError, match=f"may not set {key}"):
            build_train_config(TrainSpec(**spec, overrides={key: "x"}))
    cfg = build_train_config(
        TrainSpec(
            **spec, mixture=Mixture((Source(Path("a")),), eval_paths=(Path("e"),)).lf_keys(["e"])
        )
    )
    assert cfg["eval_dataset"] == "e" and cfg["val_size"] == 0.0 and cfg["eval_strategy"] == "steps"
    assert yaml.safe_load(yaml.safe_dump(cfg)) == cfg


def test_plan_sizes_for_the_longest_sample_of_the_data(
    files: dict[str, Path], tiny_home: Path
) -> None:
    """`plan --data`: the sequence length is the data's longest sample as train tokenizes it
    (the same count as `data check --model`), padded to a multiple of 8, at most cutoff_len."""
    longest = max(
        json.loads(invoke("data", "check", files[k], "--model", "tiny-qwen2", "--json").stdout)[
            "tokens"
        ]["length"]["max"]
        for k in ("general", "identity")
    )
    args = ["plan", "--model", "tiny-qwen2", "--json", "--data", files["general"]]
    sized = json.loads(invoke(*args, "--data", files["identity"]).stdout)
    assert sized["data"]["longest"] == longest and sized["data"]["samples"] == 20
    assert sized["data"]["length"] == 8 * -(-longest // 8) == sized["cutoff_len"]
    plain = json.loads(invoke("plan", "--model", "tiny-qwen2", "--json").stdout)
    assert plain["cutoff_len"] == 1024 and sized["peak_gb"] < plain["peak_gb"]
    cut = json.loads(invoke(*args, "--cutoff-len", "16").stdout)
    assert cut["data"]["length"] == cut["cutoff_len"] == 16
