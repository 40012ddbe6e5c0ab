"""The canonical, output-free form of a notebook, and a git "clean" filter that applies it.

A committed notebook holds only its cells' types and sources: no outputs, no execution counts, no
widget state, no cell metadata, ids ``cell-000, cell-001, ...`` by position, and the notebook
metadata ``kernelspec`` + ``language_info.name``.  ``canonical(nb)`` renders exactly that, in the
byte format ``tools/build_notebooks.py`` writes, whatever wrote ``nb`` (JupyterLab, Jupytext,
nbconvert).  Standard library only, so git can run it without the project's virtualenv.

As a git clean filter (``make lab`` configures it; ``.gitattributes`` names the notebooks)::

    git config filter.nbstrip.clean "python3 tools/nbstrip.py"

git then sees a notebook through this function: outputs that JupyterLab autosaves are invisible to
``git status``/``git diff``/``git add``, while edited cells (a filled-in exercise) still show as
changes.  The working file itself is never modified.  A notebook that cannot be parsed passes
through unchanged, so the filter never blocks git.
"""
from __future__ import annotations

import json
import sys

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def _text(source) -> str:
    return "".join(source) if isinstance(source, list) else str(source)


def cells_of(nb: dict) -> list[tuple[str, str]]:
    """``(cell_type, source)`` of every cell: all that the canonical form keeps of a cell.

    Trailing newlines of a source are dropped, as Jupytext drops them when it writes a source file.
    """
    return [(c["cell_type"], _text(c.get("source", "")).rstrip("\n")) for c in nb.get("cells", [])]


def from_cells(cells: list[tuple[str, str]]) -> dict:
    """A notebook (nbformat 4.5 dict) with these cells, no outputs and the canonical metadata."""
    out = []
    for i, (kind, source) in enumerate(cells):
        cell = {"cell_type": kind, "id": f"cell-{i:03d}", "metadata": {}, "source": source.splitlines(keepends=True)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        out.append(cell)
    return {
        "cells": out,
        "metadata": {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def render(nb: dict) -> str:
    """The committed byte format (key order as written by :func:`from_cells`)."""
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def canonical(nb: dict) -> str:
    """What git stores for ``nb``: its cells' types and sources, nothing else."""
    return render(from_cells(cells_of(nb)))


def has_outputs(nb: dict) -> bool:
    """True if any code cell carries outputs or an execution count, or widget state is saved."""
    if "widgets" in nb.get("metadata", {}):
        return True
    return any(c.get("outputs") or c.get("execution_count") is not None
               for c in nb.get("cells", []) if c.get("cell_type") == "code")


def main() -> int:
    raw = sys.stdin.buffer.read()
    try:
        sys.stdout.buffer.write(canonical(json.loads(raw.decode("utf-8"))).encode("utf-8"))
    except (ValueError, KeyError, TypeError, AttributeError):  # not a notebook: pass it through
        sys.stdout.buffer.write(raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
