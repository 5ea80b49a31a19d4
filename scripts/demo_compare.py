"""Ask the base model and a tuned run the questions of a chat file; print them side by side.

    python scripts/demo_compare.py DATA RUN [--base tiny-qwen2] [--ask N] [--json OUT]

The last step of scripts/demo.sh. Each single-turn conversation of DATA (its system prompt, if it
has one, included) is asked greedily of the base model and of RUN (its merged model if merged,
else base + adapter), each loaded once through qwenft's own chat code (qwenft.chat.ChatSession).
Before the answers it prints what RUN's manifest (qwenft.json) records: steps, training time and
wall time (as `qwenft train` said them), first and final loss, and the merge check (does the
merged model's greedy answer stop?).

--ask N keeps the first N questions; --json OUT also writes what was printed (the run's record and
the rows: question, trained, base, tuned, same) for a test to read (tests/test_demo.py).
Exit 1 when a tuned answer is not the trained one or the merge check did not pass, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import unicodedata
from pathlib import Path


def single_turn_rows(data: Path) -> list[dict]:
    """(system, question, trained answer) of every one-question conversation in a chat jsonl."""
    rows = []
    for line in data.read_text(encoding="utf-8-sig").splitlines():
        if not line.strip():
            continue
        msgs = json.loads(line)["messages"]
        system = next((m["content"] for m in msgs if m["role"] == "system"), None)
        turns = [m for m in msgs if m["role"] != "system"]
        if [m["role"] for m in turns] == ["user", "assistant"]:
            rows.append(
                {"system": system, "question": turns[0]["content"], "trained": turns[1]["content"]}
            )
    return rows


def answers(spec: str, rows: list[dict], max_new_tokens: int) -> list[tuple[str, str]]:
    """Greedy answers of one model (loaded once) to each question, each asked afresh: (the answer
    as `qwenft chat` prints it, the raw text before stripping)."""
    from qwenft.chat import ChatSession
    from qwenft.models.target import resolve_target

    session = ChatSession(resolve_target(spec), max_new_tokens=max_new_tokens)
    session.load()
    default_system = session.system
    out = []
    for row in rows:
        session.reset()
        session.system = row["system"] if row["system"] is not None else default_system
        raw: list[str] = []
        answer = session.ask(row["question"], on_text=raw.append)
        out.append((answer, "".join(raw)))
    return out


def shown(answer: str, raw: str) -> str:
    """The answer on one line; an answer of whitespace only says what it was made of (the untrained
    tiny model repeats the prompt's last token, a newline)."""
    if answer:
        return " ".join(answer.split())
    if not raw:
        return "(nothing)"
    names = {"\n": "newlines", " ": "spaces", "\t": "tabs"}
    if len(set(raw)) == 1 and raw[0] in names:
        return f"(nothing but {len(raw)} {names[raw[0]]})"
    return f"(only whitespace: {json.dumps(raw[:24])[1:-1]}{'...' if len(raw) > 24 else ''})"


def cells(text: str) -> int:
    """Terminal columns a text takes (CJK characters take two)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def fit(text: str, width: int) -> str:
    """text cut to width columns (ending in ... if cut) and padded to exactly width."""
    if cells(text) > width:
        while cells(text) > width - 3:
            text = text[:-1]
        text += "..."
    return text + " " * (width - cells(text))


def show(rows: list[dict], width: int) -> None:
    """One line per question: the question, the base model's answer, the tuned model's answer and
    whether it is the trained one (if not, the trained answer on the next line)."""
    table = [
        (r["question"], shown(r["base"], r["base_raw"]), shown(r["tuned"], r["tuned_raw"]))
        for r in rows
    ]
    heads = ("question", "base model", "tuned model")
    widths = [max(cells(h), *(cells(t[i]) for t in table)) for i, h in enumerate(heads)]
    room = max(60, width - 4) - 2 * 2  # two gaps of 2 columns, 4 for the mark
    while sum(widths) > room:  # shrink the widest column first
        widths[widths.index(max(widths))] -= 1
    print("  ".join(fit(h, w) for h, w in zip(heads, widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row, line in zip(rows, table, strict=True):
        cols = "  ".join(fit(t, w) for t, w in zip(line, widths, strict=True))
        print(f"{cols}  {'ok' if row['same'] else 'differs'}".rstrip())
        if not row["same"]:
            print(f"{'':{widths[0] + widths[1] + 4}}trained: {row['trained']}")


def run_record(run: Path) -> dict:
    """What the demo reports about the run, from its manifest (qwenft.json)."""
    m = json.loads((run / "qwenft.json").read_text(encoding="utf-8"))
    summary = m.get("summary") or {}
    gen = (m.get("merge_checks") or {}).get("generation")
    return {
        "steps": summary.get("global_step"),
        "train_runtime_s": summary.get("train_runtime_s"),  # training alone
        "wall_s": summary.get("wall_s"),  # the whole `qwenft train`, start-up included
        "first_loss": summary.get("first_loss"),
        "final_loss": summary.get("final_loss", m.get("final_loss")),
        "merged": m.get("merged"),
        "merge_check": gen,  # None: not merged, or merged with --no-check
    }


def show_record(rec: dict) -> None:
    def num(x: object, fmt: str) -> str:
        return format(x, fmt) if isinstance(x, int | float) else "?"

    print(  # the times as `qwenft train` said them: training, and the wall time with start-up
        f"the run: {rec['steps']} steps, training {num(rec['train_runtime_s'], '.0f')} s "
        f"({num(rec.get('wall_s'), '.0f')} s wall time with start-up), "
        f"loss {num(rec['first_loss'], '.3g')} -> {num(rec['final_loss'], '.3g')}"
    )
    gen = rec["merge_check"]
    if gen is None:
        print("merge check: none recorded (not merged?)")
    else:
        verdict = "ends on <|im_end|>" if gen["stopped"] else "did NOT stop"
        print(
            f"merge check: the merged model's greedy answer to {gen['prompt']!r} {verdict} "
            f"after {gen['new_tokens']} tokens"
        )
    print()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", type=Path)
    p.add_argument("run", help="the tuned run folder")
    p.add_argument("--base", default="tiny-qwen2", help="the base model (preset, folder)")
    p.add_argument("--ask", type=int, default=0, help="ask only the first N questions")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    record = run_record(Path(args.run))
    rows = single_turn_rows(args.data)
    if args.ask:
        rows = rows[: args.ask]
    if not rows:
        print(f"{args.data}: no single-turn conversation to ask", file=sys.stderr)
        return 2
    for key, spec in (("base", args.base), ("tuned", args.run)):
        for row, (text, raw) in zip(rows, answers(spec, rows, args.max_new_tokens), strict=True):
            row[key], row[key + "_raw"] = text, raw
    for row in rows:
        row["same"] = row["tuned"] == row["trained"]
    print()
    show_record(record)
    show(rows, shutil.get_terminal_size((100, 20)).columns)
    n = sum(r["same"] for r in rows)
    print()
    print(f"{n} of {len(rows)} tuned answers are the trained ones, word for word")
    if args.json:
        out = {"run": record, "rows": rows}
        args.json.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", "utf-8")
    stopped = bool(record["merge_check"] and record["merge_check"]["stopped"])
    return 0 if n == len(rows) and stopped else 1


if __name__ == "__main__":
    sys.exit(main())
