"""Build notebooks/NN_name.ipynb from notebooks/src/NN_name.py with Jupytext, and keep the pair in step.

The sources are Jupytext "percent" files (``# %% [markdown]`` starts a Markdown cell whose lines
drop their leading ``# ``, ``# %%`` a code cell); ``notebooks/jupytext.toml`` pairs each notebook
with its source, so JupyterLab (which loads Jupytext's extension from the virtualenv) saves an
edit made in either form to both.  This script is the thin wrapper around Jupytext that writes the
committed form: no outputs, stable cell ids ``cell-000, ...`` (``tools/nbstrip.py``).

    python tools/build_notebooks.py [SRC ...]       build all (or the given sources)
    python tools/build_notebooks.py --check         exit 1 if a notebook's cells differ from its
                                                    source (outputs in the working file are allowed)
    python tools/build_notebooks.py --check --index the same for git's view of the files (the index):
                                                    committed notebooks must equal their build, byte for byte
    python tools/build_notebooks.py --from-ipynb [NB ...]   carry cell edits made in an .ipynb back into
                                                    its source, then rebuild
    --force                                         overwrite notebooks with cell edits of their own

A notebook whose cells were edited since it was built (in an editor without Jupytext) is never
overwritten silently: the build refuses and names the two ways out.  "Edited" means its cells match
neither git's copy of the notebook, nor the build of git's copy of the source, nor the last notebook
this script wrote (``build/.notebook-builds.json``); outside git and without that record, an .ipynb
newer than its source counts as edited.  A notebook that is not valid JSON (merge-conflict markers)
is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nbstrip  # noqa: E402  (same folder; stdlib only, also used as the git clean filter)

ROOT = Path(__file__).resolve().parents[1]
JUPYTEXT_FILTERS = {"notebook_metadata_filter": "-all", "cell_metadata_filter": "-all"}


class EditedNotebook(Exception):
    """An .ipynb has cell edits that its source lacks; building would lose them."""


# --- the two forms -----------------------------------------------------------------------------


def build_text(source: str) -> str:
    """Percent-format source text -> the committed notebook text."""
    import jupytext

    return nbstrip.render(nbstrip.from_cells(nbstrip.cells_of(jupytext.reads(source, fmt="py:percent"))))


def source_text(nb: dict, previous: str | None = None) -> str:
    """A notebook's cells -> percent-format source text (inverse of :func:`build_text`).

    ``previous`` (the source being replaced) keeps the blank lines between unchanged cells as they
    were: Jupytext records them per cell when it reads a source and reproduces them when it writes.
    """
    import difflib

    import jupytext
    import nbformat

    node = nbformat.from_dict(nbstrip.from_cells(nbstrip.cells_of(nb)))
    for cell in node.cells:
        cell.source = "".join(cell.source)
    if previous is not None:
        old = jupytext.reads(previous, fmt="py:percent").cells
        match = difflib.SequenceMatcher(a=[(c.cell_type, c.source) for c in old],
                                        b=[(c.cell_type, c.source) for c in node.cells], autojunk=False)
        for tag, i1, i2, j1, j2 in match.get_opcodes():
            if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1):
                for o, n in zip(old[i1:i2], node.cells[j1:j2]):
                    n.metadata = dict(o.metadata)
    node.metadata = {"jupytext": dict(JUPYTEXT_FILTERS)}
    return jupytext.writes(node, fmt="py:percent")


def _cells(text: str) -> list[tuple[str, str]]:
    return nbstrip.cells_of(json.loads(text))


# --- git's view and the build record -----------------------------------------------------------


def git_index_text(root: Path, rel: str) -> str | None:
    """The staged (index) content of ``rel``, or None outside git or when it is not tracked."""
    try:
        out = subprocess.run(["git", "-C", str(root), "show", f":{rel}"], capture_output=True, check=False)
    except OSError:
        return None
    return out.stdout.decode("utf-8") if out.returncode == 0 else None


def in_git(root: Path) -> bool:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    except OSError:
        return False
    return out.returncode == 0 and Path(out.stdout.strip()).resolve() == root.resolve()


def _record_path(root: Path) -> Path:
    return root / "build" / ".notebook-builds.json"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _load_record(root: Path) -> dict:
    try:
        return json.loads(_record_path(root).read_text())
    except (OSError, ValueError):
        return {}


def _save_record(root: Path, record: dict) -> None:
    path = _record_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def hand_edited(root: Path, src: Path, target: Path, record: dict) -> bool:
    """True if ``target``'s cells were changed by hand: they match neither git's copy of the notebook,
    nor the build of git's copy of the source, nor the last notebook this script wrote."""
    cells = _cells(target.read_text())
    known = False
    staged_nb = git_index_text(root, target.relative_to(root).as_posix())
    if staged_nb is not None:
        known = True
        try:
            if cells == _cells(staged_nb):
                return False  # as git has it (a checkout, a merge): nothing of the author's to lose
        except ValueError:
            pass
    staged_src = git_index_text(root, src.relative_to(root).as_posix())
    if staged_src is not None:
        known = True
        if cells == _cells(build_text(staged_src)):
            return False
    last = record.get(target.name)
    if last is not None:
        known = True
        if _digest(nbstrip.canonical(json.loads(target.read_text()))) == last:
            return False
    if known:
        return True
    return target.stat().st_mtime > src.stat().st_mtime + 1.0  # no history: trust the clock


# --- commands ----------------------------------------------------------------------------------


def _same_age(target: Path, src: Path) -> None:
    """Give a built notebook its source's modification time.  Jupytext (in JupyterLab) refuses to
    open a paired notebook whose .ipynb is newer than its text file: it could hold edits the text
    file lacks.  A notebook built from its source holds nothing newer than the source."""
    os.utime(target, ns=(target.stat().st_atime_ns, src.stat().st_mtime_ns))


def build(root: Path, sources: list[Path], force: bool = False) -> list[str]:
    """Write each source's notebook; returns one line per notebook.  Raises EditedNotebook."""
    record, lines, edited = _load_record(root), [], []
    for src in sources:
        target = root / "notebooks" / f"{src.stem}.ipynb"
        text = build_text(src.read_text())
        rel = target.relative_to(root)
        if target.exists():
            current = target.read_text()
            try:
                json.loads(current)
            except ValueError:  # e.g. merge-conflict markers: rebuild it from the (resolved) source
                target.write_text(text)
                _same_age(target, src)
                record[target.name] = _digest(text)
                lines.append(f"rebuilt {rel} (it was not valid JSON)")
                continue
            if _cells(current) == _cells(text):
                if nbstrip.has_outputs(json.loads(current)):
                    lines.append(f"kept {rel} (same cells; its outputs stay)")
                    record[target.name] = _digest(text)
                    continue
                if current == text:
                    lines.append(f"up to date {rel}")
                    record[target.name] = _digest(text)
                    _same_age(target, src)
                    continue
            elif not force and hand_edited(root, src, target, record):
                edited.append(str(rel))
                continue
        target.write_text(text)
        _same_age(target, src)
        record[target.name] = _digest(text)
        lines.append(f"wrote {rel}")
    _save_record(root, record)
    if edited:
        raise EditedNotebook(
            "these notebooks have cell edits that their sources in notebooks/src/ do not have "
            "(made in an editor without Jupytext pairing?), so they were NOT overwritten:\n  "
            + "\n  ".join(edited)
            + "\nkeep the edits:    python tools/build_notebooks.py --from-ipynb " + " ".join(edited)
            + "\ndiscard the edits: python tools/build_notebooks.py --force")
    return lines


def from_ipynb(root: Path, notebooks: list[Path]) -> list[str]:
    """Write each notebook's cells into its source, then rebuild it (outputs kept if cells agree)."""
    lines = []
    for nb_path in notebooks:
        src = root / "notebooks" / "src" / f"{nb_path.stem}.py"
        previous = src.read_text() if src.exists() else None
        src.write_text(source_text(json.loads(nb_path.read_text()), previous))
        lines.append(f"wrote {src.relative_to(root)}")
        lines += build(root, [src])
    return lines


def worktree_problems(root: Path, sources: list[Path] | None = None) -> list[str]:
    """Notebooks in the working tree whose cells differ from their source (outputs are allowed)."""
    problems = []
    for src in sources or sorted((root / "notebooks" / "src").glob("[0-9][0-9]_*.py")):
        target = root / "notebooks" / f"{src.stem}.ipynb"
        rel = target.relative_to(root)
        if not target.exists():
            problems.append(f"{rel}: missing")
            continue
        text, current = build_text(src.read_text()), target.read_text()
        if _cells(current) != _cells(text):
            problems.append(f"{rel}: cells differ from {src.relative_to(root)}")
        elif not nbstrip.has_outputs(json.loads(current)) and current != text:
            problems.append(f"{rel}: not in the committed format (rebuild it)")
    return problems


def index_problems(root: Path) -> list[str]:
    """git's view (the index): every source has its notebook, equal to the build byte for byte."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "--", "notebooks"], capture_output=True,
                            text=True, check=True).stdout.split()
    sources = sorted(p for p in listed if p.startswith("notebooks/src/") and Path(p).suffix == ".py"
                     and Path(p).name[:2].isdigit())
    notebooks = {p for p in listed if p.startswith("notebooks/") and p.count("/") == 1 and p.endswith(".ipynb")
                 and Path(p).name[:2].isdigit()}
    problems = []
    for src in sources:
        rel = f"notebooks/{Path(src).stem}.ipynb"
        staged = git_index_text(root, rel)
        if staged is None:
            problems.append(f"{rel}: not in git")
            continue
        notebooks.discard(rel)
        if staged != build_text(git_index_text(root, src)):
            nb = json.loads(staged)
            why = "has outputs" if nbstrip.has_outputs(nb) else (
                "cells differ from its source" if nbstrip.cells_of(nb) != _cells(build_text(git_index_text(root, src)))
                else "not in the committed format")
            problems.append(f"{rel} (as staged in git): {why}")
    problems += [f"{nb}: no source notebooks/src/{Path(nb).stem}.py" for nb in sorted(notebooks)]
    return problems


def main(argv: list[str], root: Path = ROOT) -> int:
    flags = {a for a in argv if a.startswith("--")}
    unknown = flags - {"--check", "--index", "--from-ipynb", "--force"}
    if unknown:
        print(f"unknown option(s) {sorted(unknown)}; see the docstring of tools/build_notebooks.py", file=sys.stderr)
        return 2
    paths = [Path(a).resolve() for a in argv if not a.startswith("--")]
    try:
        if "--check" in flags:
            if "--index" in flags:
                problems = index_problems(root) if in_git(root) else worktree_problems(root)
            else:
                problems = worktree_problems(root, [p for p in paths if p.suffix == ".py"] or None)
            if problems:
                print("out of date (run python tools/build_notebooks.py):", *problems, sep="\n  ")
                return 1
            return 0
        if "--from-ipynb" in flags:
            notebooks = [root / "notebooks" / f"{p.stem}.ipynb" for p in paths] or sorted(
                (root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
            print(*from_ipynb(root, notebooks), sep="\n")
            return 0
        sources = [root / "notebooks" / "src" / f"{p.stem}.py" for p in paths] or sorted(
            (root / "notebooks" / "src").glob("[0-9][0-9]_*.py"))
        print(*build(root, sources, force="--force" in flags), sep="\n")
    except EditedNotebook as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
