"""A renderer for the subset of Go's text/template that Ollama Modelfile templates use (and
qwenft's Modelfile uses): `{{ .Field }}`, `{{ $var }}`, if / else if / else / end, range (with
`$i, $x :=`), `$x := expr`, the functions eq, le, or, not, len, slice, and `{{-` / `-}}` trimming.
Enough to render a Modelfile's TEMPLATE for a conversation in a test, nothing more."""

from __future__ import annotations

import re
import shlex
from typing import Any

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.DOTALL)


def _tokens(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)] with Go's whitespace trimming applied."""
    out: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", m.group(2)))
        trim_next = bool(m.group(3))
        pos = m.end()
    text = template[pos:]
    out.append(("text", text.lstrip() if trim_next else text))
    return out


class _Scope:
    def __init__(self, root: Any) -> None:
        self.root, self.dot, self.vars = root, root, {"$": root}


def _field(obj: Any, path: str) -> Any:
    for name in [p for p in path.split(".") if p]:
        obj = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return obj


def _eval(expr: str, scope: _Scope) -> Any:
    expr = expr.strip()
    if expr.startswith("(") and expr.endswith(")") and _balanced(expr[1:-1]):
        return _eval(expr[1:-1], scope)
    parts = _split(expr)
    if len(parts) > 1:
        fn, args = parts[0], [_eval(a, scope) for a in parts[1:]]
        if fn == "eq":
            return args[0] == args[1]
        if fn == "le":
            return args[0] <= args[1]
        if fn == "or":
            return next((a for a in args if a), args[-1])
        if fn == "not":
            return not args[0]
        if fn == "len":
            return len(args[0])
        if fn == "slice":
            return args[0][args[1] :]
        raise ValueError(f"unsupported function {fn}")
    if expr.startswith('"'):
        return shlex.split(expr)[0]
    if expr.isdigit():
        return int(expr)
    if expr == ".":
        return scope.dot
    if expr.startswith("$"):
        name, _, rest = expr.partition(".")
        return _field(scope.vars[name], rest)
    if expr.startswith("."):
        return _field(scope.dot, expr)
    raise ValueError(f"unsupported expression {expr!r}")


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += ch == "("
        depth -= ch == ")"
        if depth < 0:
            return False
    return depth == 0


def _split(expr: str) -> list[str]:
    """Split on spaces outside parentheses and quotes."""
    parts, buf, depth, quote = [], "", 0, False
    for ch in expr:
        if ch == '"':
            quote = not quote
        if ch == "(" and not quote:
            depth += 1
        if ch == ")" and not quote:
            depth -= 1
        if ch == " " and depth == 0 and not quote:
            if buf:
                parts.append(buf)
            buf = ""
            continue
        buf += ch
    if buf:
        parts.append(buf)
    return parts


def _parse(tokens: list[tuple[str, str]], i: int, stops: tuple[str, ...]) -> tuple[list, int]:
    """Nodes until an action starting with one of stops; returns (nodes, index of that action)."""
    nodes: list = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
            continue
        head = value.split(" ", 1)[0]
        if head in stops:
            return nodes, i
        if head == "if":
            branches, i = [], i
            cond = value[3:]
            while True:
                body, i = _parse(tokens, i + 1, ("else", "end"))
                branches.append((cond, body))
                action = tokens[i][1]
                if action == "end":
                    break
                cond = action[len("else if ") :] if action.startswith("else if ") else None
            nodes.append(("if", branches))
            i += 1
        elif head == "range":
            body, i = _parse(tokens, i + 1, ("end",))
            nodes.append(("range", value[len("range ") :], body))
            i += 1
        else:
            nodes.append(("action", value))
            i += 1
    return nodes, i


def _run(nodes: list, scope: _Scope) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "if":
            for cond, body in node[1]:
                if cond is None or _eval(cond, scope):
                    out.append(_run(body, scope))
                    break
        elif node[0] == "range":
            spec = node[1]
            names: list[str] = []
            if ":=" in spec:
                left, spec = spec.split(":=")
                names = [n.strip() for n in left.split(",")]
            items = _eval(spec, scope) or []
            saved = (scope.dot, dict(scope.vars))
            for index, item in enumerate(items):
                scope.dot = item
                if len(names) == 2:
                    scope.vars[names[0]], scope.vars[names[1]] = index, item
                elif names:
                    scope.vars[names[0]] = item
                out.append(_run(node[2], scope))
            scope.dot, scope.vars = saved
        else:
            action = node[1]
            if ":=" in action:
                name, expr = action.split(":=", 1)
                scope.vars[name.strip()] = _eval(expr, scope)
            else:
                value = _eval(action, scope)
                out.append("" if value is None else str(value))
    return "".join(out)


def render(template: str, data: dict[str, Any]) -> str:
    """template rendered with data (Ollama's: System, Tools, Messages [{Role, Content, ToolCalls}])."""
    nodes, _ = _parse(_tokens(template), 0, ())
    return _run(nodes, _Scope(data))
