"""Does a notebook show an exercise's answer before the exercise?  Two independent detectors.

* **Fingerprints**: each exercise lists regexes of its solution's key step (``Exercise.fingerprints``);
  none may match a cell above the exercise's ``check(...)`` cell.
* **Copied code**: each function of the solution file, as tokens with variable names abstracted
  (``ID``) but attribute and method names, operators and literals kept, is cut into windows of
  ``window`` tokens; the share of its tokens covered by windows that also occur in the code cells
  above the exercise must stay below ``Exercise.max_copied`` (default 0.5).  A demonstration that
  differs from the answer only by variable names is caught.

Used by the tests (``tests/test_exercises.py``) and runnable by hand:
``python -m umv2_ref.exercises.leaks [notebooks/src] [notebooks/solutions]``.
"""
from __future__ import annotations

import ast
import io
import keyword
import re
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

WINDOW = 10
MAX_COPIED = 0.5
_SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


@dataclass
class Leak:
    exercise: str
    kind: str  # "fingerprint" | "copied code"
    detail: str


def percent_cells(text: str) -> list[tuple[str, str]]:
    """(cell_type, source) pairs of a percent-format notebook source (markdown keeps its '# ' prefixes)."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif cells:
            cells[-1][1].append(line)
    return [(kind, "\n".join(lines)) for kind, lines in cells]


def exercise_cell(cells: list[tuple[str, str]], name: str) -> int | None:
    """Index of the first code cell that calls ``check("name", ...)``."""
    pattern = re.compile(r"check\(\s*[\"']" + re.escape(name) + r"[\"']")
    return next((i for i, (kind, src) in enumerate(cells) if kind == "code" and pattern.search(src)), None)


def solution_functions(path: Path) -> dict[str, str]:
    """The bodies of the solution module's functions (kernels included), without docstrings."""
    tree = ast.parse(path.read_text())
    bodies = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body[1:] if (node.body and isinstance(node.body[0], ast.Expr)
                                     and isinstance(node.body[0].value, ast.Constant)) else node.body
            bodies[node.name] = "\n".join(ast.unparse(stmt) for stmt in body)
    return bodies


def code_tokens(src: str) -> list[str]:
    """Tokens with variable names replaced by ``ID`` (names after a dot -- attributes, methods -- kept)."""
    out: list[str] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type in _SKIP:
                continue
            if tok.type == tokenize.NAME and not keyword.iskeyword(tok.string) and (not out or out[-1] != "."):
                out.append("ID")
            else:
                out.append(tok.string)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return out


def copied_fraction(solution: str, earlier: str, window: int = WINDOW) -> float:
    """Share of the solution's tokens covered by ``window``-token runs that also occur in ``earlier``."""
    sol, before = code_tokens(solution), code_tokens(earlier)
    if len(sol) < window:
        return 0.0
    seen = {tuple(before[i:i + window]) for i in range(len(before) - window + 1)}
    covered = [False] * len(sol)
    for i in range(len(sol) - window + 1):
        if tuple(sol[i:i + window]) in seen:
            covered[i:i + window] = [True] * window
    return sum(covered) / len(sol)


def find_leaks(src: Path, exercises, solutions: Path, window: int = WINDOW) -> list[Leak]:
    """Leaks of ``exercises`` (Exercise objects) in notebook source ``src``."""
    cells = percent_cells(src.read_text())
    found = []
    for ex in exercises:
        at = exercise_cell(cells, ex.name)
        if at is None:
            found.append(Leak(ex.name, "missing", f"no check({ex.name!r}, ...) cell in {src.name}"))
            continue
        earlier = cells[:at]
        for pattern in ex.fingerprints:
            hit = next((i for i, (_, text) in enumerate(earlier) if re.search(pattern, text)), None)
            if hit is not None:
                found.append(Leak(ex.name, "fingerprint", f"cell {hit} matches {pattern!r}"))
        sol = solutions / f"{ex.name}.py"
        if sol.exists():
            code = "\n".join(t for k, t in earlier if k == "code")
            for fn, body in solution_functions(sol).items():  # each function of the solution on its own
                frac = copied_fraction(body, code, window)
                if frac >= getattr(ex, "max_copied", MAX_COPIED):
                    found.append(Leak(ex.name, "copied code", f"{frac:.0%} of the tokens of the solution's "
                                                              f"{fn}() appear above"))
    return found


def main(argv: list[str]) -> int:
    from . import REGISTRY

    root = Path(__file__).resolve().parents[2]
    src_dir = Path(argv[0]) if argv else root / "notebooks" / "src"
    sol_dir = Path(argv[1]) if len(argv) > 1 else root / "notebooks" / "solutions"
    total = 0
    for src in sorted(src_dir.glob("[0-9][0-9]_*.py")):
        exercises = [ex for ex in REGISTRY.values() if ex.notebook == src.name[:2]]
        for leak in find_leaks(src, exercises, sol_dir):
            total += 1
            print(f"{src.name}: {leak.exercise}: {leak.kind}: {leak.detail}")
    print(f"{total} leak(s)")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
