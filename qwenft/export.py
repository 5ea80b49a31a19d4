"""`qwenft export RUN --format gguf`: a run as a GGUF file for llama.cpp / Ollama, verified.

The conversion is llama.cpp's own `convert_hf_to_gguf.py` (with the `conversion/` package and
`gguf-py/` it imports), taken from the llama-cpp-python source distribution on PyPI, fetched once
through pip, sha256-checked and kept under QWENFT_HOME. Quantization and verification use
llama-cpp-python itself (`llama_model_quantize`, `Llama`). Steps, all into a staging folder inside
RUN/export (nothing appears under its final name until every check has passed):

1. the weights: a LoRA/QLoRA run's merged model (merged first if it has none), a full or freeze
   run's own folder;
2. convert to f16 GGUF; quantize to q8_0 / q4_k_m when asked (the f16 intermediate is removed);
3. verify (unless --no-verify) that the file is faithful: its stop tokens read back from it;
   greedy generations of the GGUF against the merged model's (transformers) on prompts from the
   run's data: identical tokens (and the same stop) for f16, greedy agreement and |log-probability|
   differences within limits for quantized files and for a mixture-of-experts model in f16
   (MOE_F16_LIMITS). Whether the model ends its turns on <|im_end|>
   is reported (printed, manifest `stopping`), never a reason to refuse;
4. write `<run>-<quant>.Modelfile` for Ollama beside the GGUF (FROM, the Qwen chat template the
   run was trained with, tools for runs trained on tool data, SYSTEM, both stop tokens), move
   both into RUN/export and record the export (file, quant, sha256, size, checks) in the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenft.choices import GgufQuant, Template, own_weights
from qwenft.data.check import file_has_tools
from qwenft.errors import JobFailed, QwenftError
from qwenft.fsutil import refuse_existing, share_like_umask, staged_dir
from qwenft.models.llamacpp import (
    LLAMA_CPP_PYTHON,
    LLAMA_CPP_PYTHON_VERSION,
    STOP_TOKENS,
    require_llama_cpp,
)
from qwenft.models.target import reward_refusal
from qwenft.paths import qwenft_home
from qwenft.proc import launcher
from qwenft.runs.lock import RunLock
from qwenft.runs.manifest import (
    Manifest,
    StopReport,
    now_iso,
    read_manifest,
    update_manifest,
)

SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# The verify window: new tokens compared per prompt. Twice the old 32, so an answer of a few
# sentences is compared whole and a fault that grows with position (rope, attention over a longer
# context) has room to show; a conversion fault (a wrong tensor, norm or rope parameter, tokenizer)
# shows within the first tokens. Three prompts of 64 tokens keep the check to seconds for the tiny
# models on 2 CPU cores and a few minutes for a 7B model in f32 on CPU. An answer longer than the
# window is compared over the window (it is not a reason to refuse).
VERIFY_TOKENS = 64
VERIFY_PROMPTS = 3
PT_PROMPT_WORDS = 12  # a pt run is prompted with the first words of its own documents
# Quantized files: (lowest greedy agreement, highest mean |log p difference|), both measured by
# teacher forcing on the merged model's greedy continuation. A correct quantization stays well
# inside them (the tiny test models, whose flat distributions make near-ties common, measure
# q8_0 at >= 97% agreement and <= 0.02, q4_k_m at >= 80% and <= 0.25); a conversion fault (a
# garbled or misplaced tensor, a wrong norm or rope parameter) lands near chance agreement and
# differences of whole nats. So these refuse faults, not the ordinary cost of quantizing.
QUANT_LIMITS = {
    GgufQuant.Q8_0: (0.90, 0.10),
    GgufQuant.Q4_K_M: (0.60, 0.75),
}
# A mixture-of-experts model in f16: llama.cpp multiplies f16 weights with activations rounded
# to f16, and a router whose top experts are near a tie then picks others than transformers does
# in f32, which changes that token's output outright. The tiny MoE model's random routers are
# near ties often (a fifth of its choices within 0.01 of probability between the 2nd and 3rd
# expert): one merged tiny-qwen3-moe measured 2/3 answers identical, 95.2% agreement and 0.18
# mean |log p difference|, where rounding its weights to f16 in transformers moves log p by 1e-5. Token-identical answers are then not what a faithful file guarantees; the
# limits below are, and a conversion fault still lands near chance agreement.
MOE_F16_LIMITS = (0.90, 0.30)
QUANT_FTYPES = {  # llama.cpp's file types for the quantized exports
    GgufQuant.Q8_0: "LLAMA_FTYPE_MOSTLY_Q8_0",
    GgufQuant.Q4_K_M: "LLAMA_FTYPE_MOSTLY_Q4_K_M",
}


# --------------------------------------------------------------------------------------------------
# the converter: llama.cpp's own, from the pinned source distribution


def converter_dir(progress: Callable[[str], None] = print) -> Path:
    """QWENFT_HOME/llama.cpp/<version>: convert_hf_to_gguf.py, conversion/ and gguf-py/ from the
    llama-cpp-python sdist (fetched with pip, sha256-checked, extracted whole or not at all)."""
    target = qwenft_home() / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        progress(
            f"fetching llama.cpp's converter ({LLAMA_CPP_PYTHON} {LLAMA_CPP_PYTHON_VERSION} source, "
            "76.6 MB, once) ..."
        )
        out = launcher.capture(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"{LLAMA_CPP_PYTHON}=={LLAMA_CPP_PYTHON_VERSION}",
                "-d",
                tmp,
            ],
            900,
        )
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if out.returncode != 0 or not sdists:
            raise QwenftError(
                f"could not download the {LLAMA_CPP_PYTHON} {LLAMA_CPP_PYTHON_VERSION} source: "
                + (out.stderr.strip().splitlines() or ["no file"])[-1],
                "check the connection to the package index, then run the export again",
            )
        from qwenft.data.reader import file_sha256

        got = file_sha256(sdists[0])
        if got != SDIST_SHA256:
            raise QwenftError(
                f"{sdists[0].name} has sha256 {got[:16]}..., not the pinned {SDIST_SHA256[:16]}...",
                "the package index served another file; nothing was extracted",
            )
        try:
            with staged_dir(target) as stage:
                _extract_converter(sdists[0], stage)
        except (OSError, QwenftError):  # another export extracted it meanwhile
            if not (target / "convert_hf_to_gguf.py").is_file():
                raise
    return target


def _extract_converter(sdist: Path, dest: Path) -> None:
    """convert_hf_to_gguf.py, conversion/ and gguf-py/ of the sdist's vendored llama.cpp."""
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdist) as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(wanted)
        ]
        for m in members:
            m.name = m.name[len(prefix) :]
        tar.extractall(dest, members=members, filter="data")
    if not (dest / "convert_hf_to_gguf.py").is_file():
        raise QwenftError(f"{sdist.name} has no vendor/llama.cpp/convert_hf_to_gguf.py")


# --------------------------------------------------------------------------------------------------
# plan


@dataclass
class ExportPlan:
    run_dir: Path
    manifest: Manifest
    quant: str
    model_dir: Path | None  # None: a LoRA run not merged yet (merged first)
    export_dir: Path
    gguf_name: str
    modelfile_name: str
    tools: bool  # trained on tool-call data: the Modelfile's template carries them
    force: bool = False

    @property
    def gguf(self) -> Path:
        return self.export_dir / self.gguf_name

    @property
    def modelfile(self) -> Path:
        return self.export_dir / self.modelfile_name


def plan_export(run_dir: Path, quant: str, *, force: bool = False) -> ExportPlan:
    """Check the run and the request; raises QwenftError (exit 2) and writes nothing."""
    quant = GgufQuant.parse(quant, "--quant")
    run_dir = Path(run_dir).expanduser().absolute()
    m = read_manifest(run_dir)
    if m.status != "completed":
        raise QwenftError(
            f"{run_dir} is {m.status}, not completed: there is no finished model to export",
            f"finish it first (qwenft resume {run_dir}), or export a completed run",
        )
    refusal = reward_refusal(run_dir, m, "become a GGUF (llama.cpp has no value head)")
    if refusal is not None:
        raise refusal
    if Template(m.template).vision:
        raise QwenftError(
            f"{run_dir} is a vision-language run (template {m.template}): its GGUF would hold "
            "the language model only, and the vision tower needs llama.cpp's projector file "
            "(mmproj), which qwenft does not make and verify yet; nothing was written",
            f"serve the merged model instead: qwenft merge {run_dir}, then qwenft serve "
            f"{run_dir} (images as OpenAI image_url parts)",
        )
    if own_weights(m.method):
        model_dir: Path | None = run_dir
    else:
        merged = Path(m.merged) if m.merged else run_dir / "merged"
        model_dir = merged if (merged / "config.json").is_file() else None
    export_dir = run_dir / "export"
    plan = ExportPlan(
        run_dir=run_dir,
        manifest=m,
        quant=quant,
        model_dir=model_dir,
        export_dir=export_dir,
        gguf_name=f"{run_dir.name}-{quant}.gguf",
        modelfile_name=f"{run_dir.name}-{quant}.Modelfile",
        tools=_trained_on_tools(m),
        force=force,
    )
    if not force:
        for path in (plan.gguf, plan.modelfile):
            refuse_existing(path, "pass --force to replace it, or export another --quant")
    require_llama_cpp("qwenft export")
    return plan


def _trained_on_tools(m: Manifest) -> bool:
    path = Path(m.dataset.train_path or m.dataset.path)
    try:
        return path.is_file() and file_has_tools(path)
    except (OSError, QwenftError):
        return False


# --------------------------------------------------------------------------------------------------
# execute


def execute_export(
    plan: ExportPlan,
    progress: Callable[[str], None] = print,
    *,
    verify: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """Merge if needed, convert, quantize, verify, write the Modelfile, move both into place and
    record the export. A failed check is JobFailed (exit 1) and leaves nothing behind."""
    if plan.model_dir is None:
        from qwenft.lf.merge import execute_merge, plan_merge

        progress(f"{plan.run_dir} has no merged model yet: merging first")
        execute_merge(plan_merge(plan.run_dir), progress=progress, verbose=verbose)
        plan.model_dir = Path(read_manifest(plan.run_dir).merged or plan.run_dir / "merged")
    with RunLock(plan.run_dir, "export"):
        return _export_locked(plan, progress, verify, verbose)


def _export_locked(
    plan: ExportPlan, progress: Callable[[str], None], verify: bool, verbose: bool
) -> dict[str, Any]:
    assert plan.model_dir is not None
    started = time.monotonic()
    converter = converter_dir(progress)
    plan.export_dir.mkdir(exist_ok=True)
    log_path = plan.export_dir / "export.log"
    stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=plan.export_dir))
    try:
        f16 = stage / f"{plan.run_dir.name}-f16.gguf"
        progress(f"converting {plan.model_dir} to GGUF (f16) with llama.cpp's converter ...")
        progress(f"log: {log_path}" + ("" if verbose else " (-v shows it here too)"))
        env = {
            "PYTHONPATH": os.pathsep.join([str(converter / "gguf-py"), str(converter)]),
            "NO_LOCAL_GGUF": "",
        }
        argv = [
            sys.executable,
            str(converter / "convert_hf_to_gguf.py"),
            str(plan.model_dir),
            "--outfile",
            str(f16),
            "--outtype",
            "f16",
        ]
        code = launcher.run(argv, env, log_path, echo=launcher.child_echo(verbose))
        if code != 0 or not f16.is_file():
            from qwenft.runs.progress import surface_log

            surface_log(log_path, progress)
            raise JobFailed(
                f"llama.cpp's converter exited with code {code}", f"read the log: {log_path}"
            )
        out = stage / plan.gguf_name
        if plan.quant == GgufQuant.F16:
            os.rename(f16, out)
        else:
            progress(f"quantizing to {plan.quant} ...")
            _quantize(f16, out, plan.quant, log_path, verbose)
            f16.unlink()
        checks: dict[str, Any] = {}
        if verify:
            from qwenft.models.inference import quiet

            quiet(log_path)  # transformers' bars and warnings go to export.log, not the terminal
            checks = verify_gguf(out, plan, progress)
        (stage / plan.modelfile_name).write_text(
            modelfile(plan.gguf_name, plan.manifest, tools=plan.tools), encoding="utf-8"
        )
        share_like_umask(stage)
        for name in (plan.gguf_name, plan.modelfile_name):  # the Modelfile last: it names the GGUF
            if not plan.force:
                refuse_existing(plan.export_dir / name, "pass --force to replace it")
            os.replace(stage / name, plan.export_dir / name)
    except OSError as exc:  # a full disk, a folder that vanished: nothing half-written is kept
        raise JobFailed(
            f"the export could not be written: {exc}",
            f"free space in {plan.export_dir.parent} (the f16 file alone is about 2 bytes per "
            "parameter) and export again",
        ) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    from qwenft.data.reader import file_sha256

    record = {
        "file": str(plan.gguf),
        "modelfile": str(plan.modelfile),
        "quant": plan.quant,
        "sha256": file_sha256(plan.gguf),
        "size_bytes": plan.gguf.stat().st_size,
        "converter": f"llama.cpp from {LLAMA_CPP_PYTHON} {LLAMA_CPP_PYTHON_VERSION}",
        "verified": bool(verify),
        "checks": checks,
        "at": now_iso(),
        "seconds": round(time.monotonic() - started, 1),
    }
    exports = [e for e in read_manifest(plan.run_dir).exports if e.get("file") != record["file"]]
    changes: dict[str, Any] = {"exports": [*exports, record]}
    if checks.get("stopping"):
        changes["stopping"] = StopReport(**checks["stopping"])
    update_manifest(plan.run_dir, **changes)
    return record


def _quantize(src: Path, dst: Path, quant: str, log_path: Path, verbose: bool) -> None:
    """llama_model_quantize through llama-cpp-python, in a child so its per-tensor lines (C stderr)
    go to the log."""
    code = (
        "import ctypes, sys, llama_cpp\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = llama_cpp.{QUANT_FTYPES[quant]}\n"
        "rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), "
        "ctypes.byref(p))\n"
        "sys.exit(1 if rc else 0)\n"
    )
    rc = launcher.run(
        [sys.executable, "-c", code, str(src), str(dst)],
        {},
        log_path,
        echo=launcher.child_echo(verbose),
    )
    if rc != 0 or not dst.is_file():
        raise JobFailed(f"quantizing to {quant} failed (exit {rc})", f"read the log: {log_path}")


# --------------------------------------------------------------------------------------------------
# verification


def _prompts(m: Manifest, n: int) -> list[str]:
    """The first n user messages of the run's data (its own questions), or for a pt run the
    starts of its first n documents; else generic questions."""
    prompts: list[str] = []
    path = Path(m.dataset.train_path or m.dataset.path)
    try:
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(row, dict):
                    continue
                if m.stage == "pt":
                    text = row.get("text")
                    first = (
                        " ".join(text.split()[:PT_PROMPT_WORDS]) if isinstance(text, str) else ""
                    )
                else:
                    users = [
                        x.get("content")
                        for x in row.get("messages") or []
                        if isinstance(x, dict) and x.get("role") == "user"
                    ]
                    first = users[0] if users and isinstance(users[0], str) else ""
                if first and first not in prompts:
                    prompts.append(first)
                if len(prompts) >= n:
                    break
    except OSError:
        pass
    return prompts or ["Hello! Who are you?", "What is 2 + 2?", "Name a colour."][:n]


def _prompt_ids(tok: Any, m: Manifest, prompt: str) -> list[int]:
    """A question as the run prompts it (its chat template, system prompt and thinking mode); a
    pt run's text as it is."""
    if m.stage == "pt":
        return list(tok(prompt, add_special_tokens=False)["input_ids"])
    messages = [{"role": "system", "content": m.default_system}] if m.default_system else []
    messages.append({"role": "user", "content": prompt})
    kwargs = {} if m.enable_thinking is None else {"enable_thinking": m.enable_thinking}
    return list(
        tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, **kwargs)[
            "input_ids"
        ]
    )


def _greedy_hf(hf: Any, ids: list[int], stop_ids: set[int]) -> list[int]:
    """The merged model's greedy continuation (plain argmax: no generation_config penalties),
    ending on a stop token or after VERIFY_TOKENS."""
    import torch

    out: list[int] = []
    past, x = None, torch.tensor([ids])
    with torch.no_grad():
        while len(out) < VERIFY_TOKENS:
            step = hf(input_ids=x, past_key_values=past, use_cache=True)
            past, token = step.past_key_values, int(step.logits[0, -1].argmax())
            out.append(token)
            if token in stop_ids:
                break
            x = torch.tensor([[token]])
    return out


def _greedy_gguf(llm: Any, ids: list[int], stop_ids: set[int]) -> list[int]:
    """The GGUF's greedy continuation, ending as _greedy_hf's does."""
    out: list[int] = []
    llm.reset()
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
        out.append(int(token))
        if token in stop_ids or len(out) >= VERIFY_TOKENS:
            break
    return out


def _log_softmax(x: Any) -> Any:
    import numpy as np

    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def _stop_at(tokens: list[int], stop_ids: set[int]) -> int | None:
    """The new-token index of the stop token that ends tokens, None when they run to the window."""
    return len(tokens) - 1 if tokens and tokens[-1] in stop_ids else None


def verify_gguf(gguf: Path, plan: ExportPlan, progress: Callable[[str], None]) -> dict[str, Any]:
    """Is the GGUF faithful to the merged model? Its stop tokens (read back from the file) must be
    the tokenizer's; f16: its greedy tokens must be the merged model's (transformers) token for
    token over VERIFY_TOKENS new tokens, stopping where the merged model stops; quantized: the
    agreement and log-probability figures under teacher forcing must stay within QUANT_LIMITS.
    Whether the model ends its turns on <|im_end|> is reported (a fact about the model, not a
    fault of the file). Raises JobFailed on a fault."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwenft.models.llamacpp import gguf_stop_tokens, open_gguf, stop_token_faults

    assert plan.model_dir is not None
    m = plan.manifest
    tok = AutoTokenizer.from_pretrained(plan.model_dir)
    expected = {t: tok.convert_tokens_to_ids(t) for t in STOP_TOKENS}
    llm: Any = open_gguf(gguf, n_ctx=1024, logits_all=True)
    stops = gguf_stop_tokens(llm)
    faults = stop_token_faults(stops, expected)
    if faults:
        raise JobFailed(
            "the GGUF's stop tokens are wrong: " + "; ".join(faults),
            "the conversion is not faithful; nothing was written (see export.log)",
        )
    progress(
        f"stop tokens in the GGUF: eos {stops['eos']} ({stops['eos_id']}), end of generation "
        + " ".join(t for t in STOP_TOKENS if stops["eog"].get(t))
    )
    hf = AutoModelForCausalLM.from_pretrained(plan.model_dir, dtype=torch.float32).eval()
    stop_ids = set(expected.values())
    im_end = expected["<|im_end|>"]
    prompts = _prompts(m, VERIFY_PROMPTS)
    progress(
        f"verifying the GGUF against the merged model: {len(prompts)} prompts, up to "
        f"{VERIFY_TOKENS} new tokens each ..."
    )
    rows, agree_n, diff_sum, total = [], 0, 0.0, 0
    for prompt in prompts:
        ids = _prompt_ids(tok, m, prompt)
        ref = _greedy_hf(hf, ids, stop_ids)
        got = _greedy_gguf(llm, ids, stop_ids)
        # teacher forcing on the merged model's continuation: both models' next-token
        # log-probabilities at every position of it
        with torch.no_grad():
            logits = hf(torch.tensor([ids + ref])).logits[0].double().numpy()
        hf_lp = _log_softmax(logits[len(ids) - 1 : len(ids) - 1 + len(ref)])
        llm.reset()
        llm.eval(ids + ref)
        scores = np.asarray(llm.scores[len(ids) - 1 : len(ids) - 1 + len(ref)], dtype=np.float64)
        gguf_lp = _log_softmax(scores)
        pos = np.arange(len(ref))
        agree = int((gguf_lp.argmax(axis=1) == np.asarray(ref)).sum())
        diff = float(np.abs(gguf_lp[pos, ref] - hf_lp[pos, ref]).sum())
        agree_n, diff_sum, total = agree_n + agree, diff_sum + diff, total + len(ref)
        first = next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), None)
        if first is None and len(ref) != len(got):
            first = min(len(ref), len(got))
        rows.append(
            {
                "prompt": prompt,
                "tokens": len(ref),
                "identical": got == ref,
                "first_difference": first,
                "agreement": round(agree / max(len(ref), 1), 4),
                "mean_abs_logprob_diff": float(f"{diff / max(len(ref), 1):.3g}"),
                "merged_stop": _stop_at(ref, stop_ids),
                "gguf_stop": _stop_at(got, stop_ids),
                "stopped": bool(ref) and ref[-1] == im_end,
            }
        )
    agreement = agree_n / max(total, 1)
    mean_diff = float(f"{diff_sum / max(total, 1):.3g}")
    identical = sum(r["identical"] for r in rows)
    stopped = sum(r["stopped"] for r in rows)
    progress(
        f"verify: {identical}/{len(rows)} answers token-identical to the merged model over "
        f"{VERIFY_TOKENS} tokens, greedy agreement {agreement:.1%} (teacher-forced), "
        f"mean |log p difference| {mean_diff:.2g}"
    )
    if stopped == len(rows):
        progress(f"the model ends its turns: {stopped}/{len(rows)} answers stop on <|im_end|>")
    else:
        progress(
            f"note: the model is not stopping yet: {stopped}/{len(rows)} answers end on "
            f"<|im_end|> within {VERIFY_TOKENS} tokens (a fact about the model, not the file: "
            "train longer, or on data whose answers end, for it to learn to end its turns)"
        )
    result = {
        "window": VERIFY_TOKENS,
        "prompts": rows,
        "identical": identical == len(rows),
        "agreement": round(agreement, 4),
        "mean_abs_logprob_diff": mean_diff,
        "stop_tokens": stops,
        "stopping": {"answers": len(rows), "stopped": stopped, "window": VERIFY_TOKENS},
    }
    llm.close()
    moe = m.model.arch is not None and m.model.arch.moe is not None
    limits = MOE_F16_LIMITS if moe and plan.quant == GgufQuant.F16 else QUANT_LIMITS.get(plan.quant)
    if plan.quant == GgufQuant.F16 and not moe and identical < len(rows):
        bad = next(r for r in rows if not r["identical"])
        raise JobFailed(
            f"the f16 GGUF's greedy tokens differ from the merged model's (prompt "
            f"{bad['prompt'][:40]!r}: from new token {bad['first_difference']}; merged stops at "
            f"{bad['merged_stop']}, GGUF at {bad['gguf_stop']})",
            "the conversion is not faithful; nothing was written (see export.log)",
        )
    if limits:
        min_agree, max_diff = limits
        if agreement < min_agree or mean_diff > max_diff:
            raise JobFailed(
                f"the {plan.quant} GGUF strays from the merged model: greedy agreement "
                f"{agreement:.1%} (at least {min_agree:.0%} expected), mean |log p difference| "
                f"{mean_diff:.3f} (at most {max_diff} expected)",
                "the conversion or quantization is not faithful; nothing was written "
                "(see export.log)",
            )
    return result


# --------------------------------------------------------------------------------------------------
# the Ollama Modelfile


def modelfile(gguf_name: str, m: Manifest, *, tools: bool) -> str:
    """FROM the GGUF, the Qwen chat template the run trained on (ChatML; tool calls as
    LLaMA-Factory's qwen tool format when the run trained on tool data), SYSTEM, both stops."""
    system = m.default_system.replace('"""', '\\"\\"\\"')
    return (
        f"# Ollama Modelfile written by qwenft for {m.model.spec} ({m.method}, template {m.template})\n"
        f"FROM ./{gguf_name}\n"
        f'TEMPLATE """{chat_template(tools=tools, thinking=m.enable_thinking)}"""\n'
        f'SYSTEM """{system}"""\n'
        'PARAMETER stop "<|im_end|>"\n'
        'PARAMETER stop "<|endoftext|>"\n'
    )


# LLaMA-Factory's qwen tool prompt (llamafactory/data/tool_utils.py QWEN_TOOL_PROMPT), in Go
# template form: the tools as {"type": "function", "function": ...} lines.
_TOOLS = (
    "{{- if .Tools }}\n\n# Tools\n\nYou may call one or more functions to assist with the user "
    "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    '{{- range .Tools }}\n{"type": "function", "function": {{ .Function }}}{{- end }}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>{{- end }}"
)


def chat_template(*, tools: bool, thinking: bool | None) -> str:
    """The Ollama (Go template) form of the qwen / qwen3 ChatML format LLaMA-Factory trains
    (its format_user / format_assistant / format_observation): a user turn ends by opening the
    assistant's; an answer ends with <|im_end|> (left open on the last message, for Ollama to
    continue); a tool result is a user turn in <tool_response>; a Qwen3 run trained without
    thinking answers after an empty think block, as LLaMA-Factory prompts it."""
    # the answer being prompted (last message) or trained (the one after): after an empty think
    after = (
        "{{ if le (len (slice $.Messages $i)) 2 }}<think>\n\n</think>\n\n{{ end }}"
        if thinking is False
        else ""
    )
    system = (
        "{{- if or .System .Tools }}<|im_start|>system\n{{ .System }}" + _TOOLS
        if tools
        else "{{- if .System }}<|im_start|>system\n{{ .System }}"
    ) + "<|im_end|>\n{{ end }}"
    answer = (
        "{{- if .ToolCalls }}{{ range $j, $c := .ToolCalls }}{{ if $j }}\n{{ end }}<tool_call>\n"
        '{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}\n'
        "</tool_call>{{ end }}{{ else }}{{ .Content }}{{ end }}"
        if tools
        else "{{ .Content }}"
    )
    tool_turn = (
        '{{ else if eq .Role "tool" }}<|im_start|>user\n<tool_response>\n{{ .Content }}\n'
        "</tool_response><|im_end|>\n<|im_start|>assistant\n" + after
        if tools
        else ""
    )
    return (
        system
        + "{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        + '{{- if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        + "<|im_start|>assistant\n"
        + after
        + '{{ else if eq .Role "assistant" }}'
        + answer
        + "{{ if not $last }}<|im_end|>\n{{ end }}"
        + tool_turn
        + "{{ end }}{{- end }}"
    )
