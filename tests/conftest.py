"""Shared fixtures and the test tiers.

Every test gets its own QWENFT_HOME and working folder (`isolated`). The tiny models are built once
per session and linked into a test's home (`tiny_home`); trained runs that several tests only read
are trained once per session in a session home (`lora_run`, `quick_runs`, `pt_run`). `make test`
runs the suite on two pytest-xdist workers: the session's folders and runs are then made once for
both (`session_dir`, `made_once`: whichever worker needs one first makes it under a file lock).

Tiers are set here from the fixtures a test uses, never by hand (tests/README.md):
  model  the test needs the Qwen vocabulary or the tiny models (MODEL_FIXTURES);
  e2e    it launches the real LLaMA-Factory in child processes (E2E_FIXTURES); also `model`.
Everything else is the fast tier (`make test-fast`, `-m "not model"`), which must not import torch,
transformers or llamafactory: when only fast tests are selected, a test (or a module's collection)
that imports one of them fails the run, named."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from qwenft.fsutil import file_lock
from tests.helpers.builders import RECORDED_VARS, chat_rows, write_jsonl, write_model_folder
from tests.helpers.e2e import (
    FEW,
    LEARN,
    LEARN_STEPS,
    MOE_LEARN,
    MOE_LEARN_STEPS,
    QUICK,
    QUICK_CUTOFF_96,
    Qwenft,
    copy_run,
)

FAKE_CLI = Path(__file__).parent / "helpers" / "fake_llamafactory_cli.py"

# --------------------------------------------------------------------------------------------------
# tiers

MODEL_FIXTURES = {"vocab_file", "shared_home", "tiny_home"}
E2E_FIXTURES = {"qwenft", "e2e_home", "lora_run", "merged_lora", "quick_runs", "pt_run", "moe_run"}
HEAVY_MODULES = ("torch", "transformers", "llamafactory")

_fast_session = pytest.StashKey[bool]()
_heavy_before = pytest.StashKey[set]()
_heavy_report = pytest.StashKey[list]()
_heavy_first_seen: dict[str, str] = {}  # module -> where it was first imported in this process


def pytest_configure(config: pytest.Config) -> None:
    """On several xdist workers, each worker's torch (in-process and in the LLaMA-Factory children
    it starts) computes on one thread: two workers then use the two cores without oversubscribing
    them (torch's default, a thread per core in every process, made parallel runs slower)."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, "1")


@pytest.hookimpl(tryfirst=True)  # before -m deselects on these markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & E2E_FIXTURES:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.model)
        elif used & MODEL_FIXTURES:
            item.add_marker(pytest.mark.model)


def pytest_collection_finish(session: pytest.Session) -> None:
    """A fast-tier session: every selected test is fast (what `make test-fast` selects)."""
    session.config.stash[_fast_session] = bool(session.items) and not any(
        item.get_closest_marker("model") for item in session.items
    )


def _heavy_loaded() -> set[str]:
    return {m for m in HEAVY_MODULES if m in sys.modules}


def _note_heavy(before: set[str], where: str) -> set[str]:
    new = _heavy_loaded() - before
    for module in new:
        _heavy_first_seen.setdefault(module, where)
    return new


def pytest_sessionstart(session: pytest.Session) -> None:
    _note_heavy(set(), "something loaded before collection (a conftest or a pytest plugin)")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    before = _heavy_loaded()
    yield
    _note_heavy(before, f"importing {collector.nodeid or collector.name} (collection)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_heavy_before] = _heavy_loaded()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    new = _note_heavy(item.stash.get(_heavy_before, set()), item.nodeid)
    if not new or not item.config.stash.get(_fast_session, False):
        return
    item.stash[_heavy_before] = _heavy_loaded()  # report each import once
    message = (
        f"fast tier: {item.nodeid} imported {', '.join(sorted(new))} (during {report.when}); "
        "a test that needs the model stack must use a model fixture "
        f"({', '.join(sorted(MODEL_FIXTURES | E2E_FIXTURES))}) so it is marked `model`"
    )
    if report.passed:
        report.outcome = "failed"
        report.longrepr = message
    else:
        report.sections.append(("fast tier", message))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Whatever slipped past the per-test check (a collection-time import) fails the run here."""
    if not session.config.stash.get(_fast_session, False):
        return
    heavy = sorted(_heavy_loaded())
    if not heavy:
        return
    lines = [f"{m} was imported by {_heavy_first_seen.get(m, 'an unknown import')}" for m in heavy]
    session.config.stash[_heavy_report] = lines
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    lines = config.stash.get(_heavy_report, [])
    if lines:
        terminalreporter.write_sep(
            "=", "FAILED: the fast tier imported the model stack", red=True, bold=True
        )
        for line in lines:
            terminalreporter.write_line(line, red=True)
        terminalreporter.write_line(
            "fast-tier tests must not import torch, transformers or llamafactory: move the import "
            "into a test that uses a model fixture (tests/README.md)"
        )


# --------------------------------------------------------------------------------------------------
# every test: its own home and working folder


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private QWENFT_HOME and cwd for every test; no tracebacks swallowed by QWENFT_DEBUG."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("QWENFT_HOME", str(home))
    monkeypatch.delenv("QWENFT_DEBUG", raising=False)
    # a suite run inside a Slurm step or a Kubeflow pod must not place its runs there
    from qwenft.launch.schedulers import SCHEDULERS

    for name in {v for s in SCHEDULERS for v in s.variables} | {
        k for k in os.environ if k.startswith("PET_")
    }:
        monkeypatch.delenv(name, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return home


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    """The four QA conversations (helpers.builders.QA) as chat JSONL."""
    return write_jsonl(tmp_path / "chat.jsonl", chat_rows())


@pytest.fixture
def local_model(tmp_path: Path) -> Path:
    """A folder that looks like a Qwen2-0.5B-Instruct checkpoint (config.json only: for the
    command-building tests with the stand-in llamafactory-cli, which never loads it)."""
    return write_model_folder(tmp_path / "Qwen2-0.5B-Instruct")


@pytest.fixture
def data_app():  # noqa: ANN201 - a typer.Typer
    """A Typer app holding only `qwenft data` (helpers.cli.data_app)."""
    from tests.helpers.cli import data_app

    return data_app()


@pytest.fixture
def fake_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The recording llamafactory-cli (helpers/fake_llamafactory_cli.py) first on PATH; returns
    the JSON-lines record file (read it with helpers.builders.read_calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "llamafactory-cli"
    shim.write_text(f"#!{sys.executable}\n" + FAKE_CLI.read_text())
    shim.chmod(0o755)
    record = tmp_path / "lf-calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LF_RECORD", str(record))
    monkeypatch.setenv("FAKE_LF_VARS", ",".join(RECORDED_VARS))
    return record


@pytest.fixture
def no_token_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stub `qwenft train`'s length measurement and its tokenizing before launch, which load the
    model's tokenizer: for command-building tests on config-only model folders. The end-to-end
    tests run them for real (test_e2e.py: overlength, the tokenized cache)."""
    from qwenft.data.pipeline import TokenStats

    stats = TokenStats(suggested_cutoff_len=64)  # nothing over cutoff_len, the total unmeasured
    monkeypatch.setattr("qwenft.train.overlength_stats", lambda plan, progress: stats)
    monkeypatch.setattr("qwenft.train.tokenize_ahead", lambda *args: None)


# --------------------------------------------------------------------------------------------------
# model tier: the real Qwen vocabulary and the tiny models


def session_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder of the test session's, the same for every xdist worker (their base temp folders
    share a parent), created if missing."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / name
    path.mkdir(exist_ok=True)
    return path


def made_once(root: Path, name: str, make: Callable[[], None]) -> None:
    """Run make() unless it already completed in this session (in any worker); workers that
    need it meanwhile wait on the lock. A make() that fails is tried again by the next user."""
    with file_lock(root / f".{name}.lock"):
        done = root / f".{name}.done"
        if not done.exists():
            make()
            done.touch()


@pytest.fixture(scope="session")
def vocab_file() -> Path:
    """The real Qwen vocabulary, fetched once into the default home (~/.cache/qwenft)."""
    from qwenft.models.tiny import ensure_vocab

    return ensure_vocab()


@pytest.fixture(scope="session")
def shared_home(tmp_path_factory: pytest.TempPathFactory, vocab_file: Path) -> Path:
    """The session's vocab, tiny models (built on first use, by whichever test needs one, under
    models.tiny's own lock) and llama.cpp's converter (fetched by the first GGUF export: a
    76.6 MB download and pip's metadata build of it, once instead of once per test)."""
    home = session_dir(tmp_path_factory, "qwenft-home")

    def make() -> None:
        (home / "vocab").mkdir(exist_ok=True)
        link = home / "vocab" / "qwen.tiktoken"
        if not link.is_symlink():
            link.symlink_to(vocab_file)
        (home / "models").mkdir(exist_ok=True)
        (home / "llama.cpp").mkdir(exist_ok=True)

    made_once(home, "home", make)
    return home


def _link_models(home: Path, shared_home: Path) -> Path:
    for name in ("vocab", "models", "llama.cpp"):
        link = home / name
        if not link.exists():
            link.symlink_to(shared_home / name)
    return home


@pytest.fixture
def tiny_home(shared_home: Path, isolated: Path) -> Path:
    """This test's home, with the session's vocab, tiny models and llama.cpp converter linked in
    (each made on first use)."""
    return _link_models(isolated, shared_home)


# --------------------------------------------------------------------------------------------------
# e2e tier: the real LLaMA-Factory


@pytest.fixture
def qwenft(tiny_home: Path) -> Qwenft:
    """`qwenft(*args)` runs `python -m qwenft ...` in this test's home and folder with the real
    llamafactory-cli; `qwenft.popen(*args)` starts it without waiting."""
    return Qwenft()


@pytest.fixture(scope="session")
def e2e_home(tmp_path_factory: pytest.TempPathFactory, shared_home: Path) -> Qwenft:
    """A session home and folder for the shared runs below: tests must not write into it (copy a
    run with helpers.e2e.copy_run first)."""
    root = session_dir(tmp_path_factory, "e2e-session")

    def make() -> None:
        (root / "home").mkdir(exist_ok=True)
        (root / "work").mkdir(exist_ok=True)
        _link_models(root / "home", shared_home)
        write_jsonl(root / "chat.jsonl", chat_rows())

    made_once(root, "e2e-home", make)
    return Qwenft(home=root / "home", cwd=root / "work")


@pytest.fixture(scope="session")
def lora_run(e2e_home: Qwenft) -> Path:
    """The session's trained LoRA run: tiny-qwen2 learns the four QA rows (LEARN, 80 steps).
    It is also the first run on the chat data in the session home: it tokenizes and caches it."""
    run = e2e_home.cwd / "runs" / "lora"
    data = e2e_home.cwd.parent / "chat.jsonl"
    args = ["--model", "tiny-qwen2", "--method", "lora", "--data", data, "-o", run]
    made_once(
        e2e_home.cwd.parent,
        "lora_run",
        lambda: e2e_home("train", *args, "--max-steps", LEARN_STEPS, *LEARN),
    )
    return run


@pytest.fixture(scope="session")
def moe_run(e2e_home: Qwenft) -> Path:
    """The session's trained mixture-of-experts LoRA run: tiny-qwen3-moe with LoRA on the
    attention and the experts (qwenft's initial adapter), with the router's balancing loss on,
    learns the four QA rows (MOE_LEARN, MOE_LEARN_STEPS; test_moe.py). What it printed on stderr
    is in `moe.stderr` beside it."""
    run = e2e_home.cwd / "runs" / "moe"
    data = e2e_home.cwd.parent / "chat.jsonl"
    args = ["--model", "tiny-qwen3-moe", "--method", "lora", "--data", data, "-o", run]

    def make() -> None:
        out = e2e_home("train", *args, "--max-steps", MOE_LEARN_STEPS, *MOE_LEARN)
        (run.parent / "moe.stderr").write_text(out.stderr, encoding="utf-8")

    made_once(e2e_home.cwd.parent, "moe_run", make)
    return run


@pytest.fixture(scope="session")
def rm_run(e2e_home: Qwenft) -> Path:
    """The session's reward model: a LoRA on tiny-qwen2 with LLaMA-Factory's value head (--stage
    rm), 20 steps on 32 pairs (builders.reward_pairs seed 1: sums answered vs dodged); held-out
    pairs (seed 2) are `rm-held.jsonl` beside the session's data."""
    from tests.helpers.builders import reward_pairs

    root = e2e_home.cwd.parent
    run = e2e_home.cwd / "runs" / "rm"

    def make() -> None:
        data = write_jsonl(root / "rm-pairs.jsonl", reward_pairs(1, 32))
        write_jsonl(root / "rm-held.jsonl", reward_pairs(2, 16))
        out = e2e_home(
            "train", "--model", "tiny-qwen2", "--stage", "rm", "--data", data, "-o", run,
            "--max-steps", "20", "--lr", "5e-3", *FEW,
        )  # fmt: skip
        (run.parent / "rm.stderr").write_text(out.stderr, encoding="utf-8")

    made_once(root, "rm_run", make)
    return run


@pytest.fixture(scope="session")
def quick_runs(e2e_home: Qwenft, lora_run: Path) -> dict[str, Path]:
    """Two quick runs after `lora_run` in the same home, on the same data: `qlora` (4-bit, same
    data arguments: reuses lora_run's tokenized data) and `cutoff96` (LoRA, another cutoff_len:
    a new cache entry; with a tool_format, which qwenft does not reproduce, so LLaMA-Factory
    tokenizes it inside the job)."""
    data = e2e_home.cwd.parent / "chat.jsonl"
    runs = {"qlora": e2e_home.cwd / "runs" / "qlora", "cutoff96": e2e_home.cwd / "runs" / "c96"}
    base = ["--model", "tiny-qwen2", "--data", data]

    def make() -> None:
        e2e_home("train", *base, "--method", "qlora", "-o", runs["qlora"], *QUICK)
        e2e_home(
            "train", *base, "-o", runs["cutoff96"], *QUICK_CUTOFF_96, "--set", "tool_format=qwen"
        )

    made_once(e2e_home.cwd.parent, "quick_runs", make)
    return runs


@pytest.fixture(scope="session")
def merged_lora(e2e_home: Qwenft, lora_run: Path) -> Path:
    """A copy of `lora_run` merged once (`qwenft merge --verify`; what it printed is in
    `merge.stdout` and `merge.stderr` beside the folder): the merge and chat test and the quiet
    terminal test read it, the DPO test starts from it, the GGUF export test exports a copy."""
    run = e2e_home.cwd / "runs" / "lora-merged"

    def make() -> None:
        shutil.rmtree(run, ignore_errors=True)  # a merge that failed earlier in the session
        copy_run(lora_run, run)
        out = e2e_home("merge", run, "--verify")
        (run.parent / "merge.stdout").write_text(out.stdout, encoding="utf-8")
        (run.parent / "merge.stderr").write_text(out.stderr, encoding="utf-8")

    made_once(e2e_home.cwd.parent, "merged_lora", make)
    return run


@pytest.fixture(scope="session")
def pt_run(e2e_home: Qwenft) -> Path:
    """A continued-pre-training run (--stage pt, LoRA) on the QA answers as a text corpus, 12 steps
    of 32-token blocks at lr 5e-3 (what it printed on stderr is in `pt.stderr` beside it): the pt
    test checks that its loss fell, test_export.py exports it."""
    from tests.helpers.builders import QA

    corpus = e2e_home.cwd.parent / "corpus.txt"
    run = e2e_home.cwd / "runs" / "pt"

    def make() -> None:
        corpus.write_text("\n".join(a for _ in range(12) for _, a in QA) + "\n", encoding="utf-8")
        out = e2e_home(
            "train",
            "--stage",
            "pt",
            "--model",
            "tiny-qwen2",
            "--data",
            corpus,
            "-o",
            run,
            "--max-steps",
            "12",
            "--lr",
            "5e-3",
            *FEW[:4],
            "--cutoff-len",
            "32",
            *FEW[6:],
        )
        (run.parent / "pt.stderr").write_text(out.stderr, encoding="utf-8")

    made_once(e2e_home.cwd.parent, "pt_run", make)
    return run
