"""Grade exercises: ``python -m umv2_ref.exercises.grade NOTEBOOK.ipynb [...] [--csv FILE]``.

For each student notebook: execute it headless in a fresh kernel (smoke sizes, ``UMV2_SMOKE=1``,
unless ``--full``), errors in cells allowed, then -- in the same kernel -- run every exercise of that
notebook (found by the ``NN_`` prefix of the file name, and by the ``check("name", ...)`` calls in it)
on the learner's function, looked up by the stub's name.  A table lists notebook x exercise with
status and the named mistake, then totals; ``--csv FILE`` writes the same rows.  Exit status 0 when
grading completed (whatever the students' results), 1 when a notebook could not be read at all.

``python -m umv2_ref.exercises.grade --solutions`` grades the reference solutions in
``notebooks/solutions/`` instead (no notebook is executed); it exits 1 unless every one is correct.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import REGISTRY, check
from .harness import STATUSES

ROOT = Path(__file__).resolve().parents[2]
SOLUTIONS = ROOT / "notebooks" / "solutions"


@dataclass
class Row:
    notebook: str
    exercise: str
    status: str
    mistake: str = ""
    message: str = ""


# ----------------------------------------------------------------------------------------------
# inside the notebook's kernel
# ----------------------------------------------------------------------------------------------


def grade_namespace(exercises: list[str], namespace: dict, out_path: str, timeout: float | None = None) -> None:
    """Run each exercise's checker on the function the notebook defined; write JSON rows to ``out_path``."""
    rows = []
    for name in exercises:
        fn_name = REGISTRY[name].fn_name
        fn = namespace.get(fn_name)
        if fn is None:
            rows.append({"exercise": name, "status": "not attempted", "mistake": "",
                         "message": f"no function {fn_name!r} defined in the notebook"})
            continue
        res = check(name, fn, verbose=False, timeout=timeout)
        rows.append({"exercise": name, "status": res.status, "mistake": res.mistake or "", "message": res.message})
    Path(out_path).write_text(json.dumps(rows))


# ----------------------------------------------------------------------------------------------
# outside: execute notebooks
# ----------------------------------------------------------------------------------------------


def notebook_exercises(path: Path, nb) -> list[str]:
    """Registered exercises of this notebook: by file-name prefix, plus any check("name") in its code."""
    prefix = re.match(r"(\d\d)_", path.name)
    names = [n for n, ex in REGISTRY.items() if prefix and ex.notebook == prefix.group(1)]
    for cell in nb.cells:
        if cell.cell_type == "code":
            for found in re.findall(r"check\(\s*[\"'](\w+)[\"']", cell.source):
                if found in REGISTRY and found not in names:
                    names.append(found)
    return names  # in the notebook's order (the order the definitions register them)


def _kernel_manager():
    """A kernel manager that starts ipykernel with *this* Python (same packages, same umv2_ref)."""
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                      display_name="umv2 grading", language="python")

    class _Specs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return spec

    return KernelManager(kernel_name="umv2-grade", kernel_spec_manager=_Specs())


def grade_notebook(path: Path, cell_timeout: float, check_timeout: float | None) -> list[Row]:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    nb = nbformat.read(str(path), as_version=4)
    names = notebook_exercises(path, nb)
    if not names:
        return [Row(path.name, "-", "not attempted", message="no registered exercise belongs to this notebook")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        nb.cells.append(nbformat.v4.new_code_cell(
            "from umv2_ref.exercises.grade import grade_namespace as _umv2_grade\n"
            f"_umv2_grade({names!r}, globals(), {str(out)!r}, {check_timeout!r})"))
        client = NotebookClient(nb, km=_kernel_manager(), timeout=cell_timeout, allow_errors=True,
                                interrupt_on_timeout=True, resources={"metadata": {"path": str(path.parent)}})
        problem = ""
        try:
            client.execute()
        except DeadKernelError:
            problem = "the notebook's kernel died while executing it (a crash in a cell outside check?)"
        except CellTimeoutError:
            problem = f"a cell ran longer than {cell_timeout:g} s and could not be interrupted"
        except Exception as err:  # a broken notebook must not stop the grading of the others
            problem = f"executing the notebook failed: {type(err).__name__}: {err}"
        if out.exists():
            return [Row(path.name, r["exercise"], r["status"], r["mistake"], r["message"])
                    for r in json.loads(out.read_text())]
    status = "crashed" if "died" in problem else "timeout" if "longer" in problem else "crashed"
    return [Row(path.name, name, status, message=problem or "grading cell produced no results") for name in names]


def grade_solutions() -> list[Row]:
    rows = []
    for name in REGISTRY:
        path = SOLUTIONS / f"{name}.py"
        if not path.exists():
            rows.append(Row(f"solutions, notebook {REGISTRY[name].notebook}", name, "not attempted",
                            message="no solution file"))
            continue
        spec = importlib.util.spec_from_file_location(f"umv2_solution_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        res = check(name, module.solution, verbose=False)
        rows.append(Row(f"solutions, notebook {REGISTRY[name].notebook}", name, res.status, res.mistake or "",
                        res.message))
    return rows


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def render(rows: list[Row]) -> str:
    width_nb = max([len("notebook")] + [len(r.notebook) for r in rows])
    width_ex = max([len("exercise")] + [len(r.exercise) for r in rows])
    lines = [f"{'notebook':{width_nb}}  {'exercise':{width_ex}}  {'status':13}  mistake",
             "-" * (width_nb + width_ex + 32)]
    for r in rows:
        lines.append(f"{r.notebook:{width_nb}}  {r.exercise:{width_ex}}  {r.status:13}  {r.mistake}")
    counts = Counter(r.status for r in rows)
    per_nb = {}
    for r in rows:
        per_nb.setdefault(r.notebook, Counter())[r.status] += 1
    lines.append("-" * (width_nb + width_ex + 32))
    for nb_name, c in per_nb.items():
        lines.append(f"{nb_name:{width_nb}}  {c['correct']}/{sum(c.values())} correct")
    lines.append("totals: " + ", ".join(f"{s} {counts[s]}" for s in STATUSES)
                 + f"  ({len(rows)} checks, {len(per_nb)} notebook(s))")
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["notebook", "exercise", "status", "mistake", "message"])
        for r in rows:
            writer.writerow([r.notebook, r.exercise, r.status, r.mistake, r.message])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m umv2_ref.exercises.grade", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="student notebooks (.ipynb)")
    parser.add_argument("--solutions", action="store_true", help="grade notebooks/solutions/ instead")
    parser.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    parser.add_argument("--full", action="store_true", help="run notebooks at full size (default: UMV2_SMOKE=1)")
    parser.add_argument("--cell-timeout", type=float, default=600.0, help="seconds per notebook cell (600)")
    parser.add_argument("--check-timeout", type=float, default=None, help="seconds per exercise check (30)")
    args = parser.parse_args(argv)
    if args.solutions == bool(args.notebooks):
        parser.error("give notebooks to grade, or --solutions (not both)")
    missing = [p for p in args.notebooks if not p.is_file()]
    if missing:
        parser.error(f"not a file: {', '.join(map(str, missing))}")
    start = time.perf_counter()
    if args.solutions:
        rows = grade_solutions()
    else:
        os.environ["UMV2_SMOKE"] = "0" if args.full else "1"
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("MPLBACKEND", "Agg")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(
            os.pathsep) if p])  # the kernel imports this checkout's umv2_ref
        rows, unreadable = [], 0
        for path in args.notebooks:
            print(f"grading {path} ...", file=sys.stderr, flush=True)
            try:
                rows.extend(grade_notebook(path.resolve(), args.cell_timeout, args.check_timeout))
            except Exception as err:  # not a notebook at all: say so, grade the others
                unreadable += 1
                print(f"could not read {path}: {type(err).__name__}: {err}", file=sys.stderr)
    print(render(rows))
    print(f"({time.perf_counter() - start:.1f} s)")
    if args.csv:
        write_csv(rows, args.csv)
    if args.solutions:
        return 0 if all(r.status == "correct" for r in rows) else 1
    return 1 if unreadable else 0


if __name__ == "__main__":
    sys.exit(main())
