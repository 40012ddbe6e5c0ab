"""Build notebooks/NN_name.ipynb from their diffable sources notebooks/src/NN_name.py.

Source format ("percent" cells, as Jupytext's py:percent):

    # %% [markdown]
    # # Title
    # Prose, LaTeX ...
    # %%
    x = 1

Markdown cells drop the leading "# " of each line.  Notebooks are written without outputs.
Usage: ``python tools/build_notebooks.py`` (all) or with source paths; ``--check`` exits 1 when
any committed .ipynb differs from what its source builds (run by the tests).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "notebooks" / "src"
OUT = ROOT / "notebooks"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def parse_cells(text: str) -> list[tuple[str, str]]:
    """Split percent-format text into (cell_type, source) pairs."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif cells:
            cells[-1][1].append(line)
        elif line.strip():
            raise ValueError(f"text before the first '# %%' cell marker: {line!r}")
    result = []
    for kind, lines in cells:
        while lines and not lines[-1].strip():
            lines.pop()
        if kind == "markdown":
            lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines]
        result.append((kind, "\n".join(lines)))
    return result


def build(src: Path) -> dict:
    cells = []
    for i, (kind, source) in enumerate(parse_cells(src.read_text())):
        cell = {"cell_type": kind, "id": f"cell-{i:03d}", "metadata": {}, "source": source.splitlines(keepends=True)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {
        "cells": cells,
        "metadata": {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def render(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [Path(a) for a in argv if a != "--check"] or sorted(SRC.glob("[0-9][0-9]_*.py"))
    stale = []
    for src in paths:
        target = OUT / (src.stem + ".ipynb")
        text = render(build(src))
        if check:
            if not target.exists() or target.read_text() != text:
                stale.append(str(target.relative_to(ROOT)))
        else:
            target.write_text(text)
            print(f"wrote {target.relative_to(ROOT)}")
    if stale:
        print("out of date (run python tools/build_notebooks.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
