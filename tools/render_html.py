"""Execute notebooks headless and write HTML pages that work offline (what ``make notebooks`` runs).

nbconvert's default page loads MathJax, require.js and the widget renderer from the network, so
offline the equations stay raw ``$...$`` and widget outputs are empty.  This page instead

* renders the equations with a local MathJax: the copy shipped by the ``jupyter-server-mathjax``
  package is copied once to ``<out>/mathjax/`` and referenced by a relative URL;
* shows each ipywidgets control's **default view**: the outputs its first call drew (kept in the
  widget state while executing) replace the widget, under a note that the control itself needs
  JupyterLab; progress-bar widgets are dropped;
* loads no script or stylesheet from the network (the template ``tools/html_offline``).

    python tools/render_html.py [--no-execute] [--timeout S] [--tries N] [--out build] notebooks/01_*.ipynb ...

A cell that runs past ``--timeout`` seconds, or a dead kernel, runs that notebook again in a fresh
kernel (``--tries`` runs in all).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = Path(__file__).resolve().parent
MATHJAX_URL = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def mathjax_source() -> Path:
    """The MathJax 2 tree of the jupyter-server-mathjax package."""
    try:
        import jupyter_server_mathjax
    except ImportError as err:
        raise SystemExit("offline HTML needs the jupyter-server-mathjax package (requirements.txt)") from err
    path = Path(jupyter_server_mathjax.__file__).parent / "static"
    if not (path / "MathJax.js").exists():
        raise SystemExit(f"no MathJax.js under {path}")
    return path


def install_mathjax(out: Path) -> Path:
    """Copy the local MathJax next to the pages (once); returns the copy."""
    target = out / "mathjax"
    if not (target / "MathJax.js").exists():
        shutil.copytree(mathjax_source(), target, dirs_exist_ok=True)
    return target


def _outputs_of(model_id: str, state: dict, seen: set | None = None) -> list[dict]:
    """All outputs captured by Output widgets inside widget ``model_id`` (depth first)."""
    seen = set() if seen is None else seen
    if model_id in seen or model_id not in state:
        return []
    seen.add(model_id)
    model = state[model_id]
    if model.get("model_name") == "OutputModel":
        return list(model.get("state", {}).get("outputs", []))
    outputs = []
    for child in model.get("state", {}).get("children", []):
        if isinstance(child, str) and child.startswith("IPY_MODEL_"):
            outputs += _outputs_of(child[len("IPY_MODEL_"):], state, seen)
    return outputs


def static_widgets(nb) -> int:
    """Replace every widget output by its captured default view (or drop it); returns the count."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    replaced = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        new = []
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW not in data:
                new.append(out)
                continue
            replaced += 1
            plain = data.get("text/plain", "")
            plain = "".join(plain) if isinstance(plain, list) else plain
            if not plain.startswith("interactive("):
                continue  # a progress bar or another display-only widget: nothing to show offline
            view = _outputs_of(data[WIDGET_VIEW].get("model_id", ""), state)
            note = ("<p><em>Interactive control (ipywidgets): open this notebook in JupyterLab to move it. "
                    + ("Its default view:" if view else "Its default view is the figure above.") + "</em></p>")
            new.append({"output_type": "display_data", "metadata": {}, "data": {"text/html": note}})
            new += [o for o in view if o.get("output_type") != "error"]
        cell["outputs"] = new
    nb.metadata.pop("widgets", None)
    return replaced


def execute(nb, path: Path, timeout: int, tries: int = 2):
    """The notebook executed in a fresh kernel; returns a new notebook (``nb`` is left as it was).

    A cell that runs past ``timeout`` seconds or a kernel that dies makes the whole notebook run
    again from a fresh kernel, up to ``tries`` runs in all: under heavy load a run has been seen to
    stall with client and kernel both idle, and a second run recovers it.  A cell that raises is
    not retried (the error is the notebook's own).
    """
    import copy
    import time

    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    def run_once():
        run = copy.deepcopy(nb)
        NotebookClient(run, timeout=timeout, kernel_name="python3", store_widget_state=True,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        return run

    for attempt in range(1, tries):
        start = time.monotonic()
        try:
            return run_once()
        except (CellTimeoutError, DeadKernelError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"{path.name}: {type(err).__name__} after {time.monotonic() - start:.0f} s ({reason}); "
                  f"running it again in a fresh kernel (run {attempt + 1} of {tries})", file=sys.stderr, flush=True)
    return run_once()  # the last try: its error is the answer


def render(nb, name: str, out: Path) -> Path:
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="html_offline", extra_template_basedirs=[str(TEMPLATES)])
    exporter.mathjax_url = MATHJAX_URL
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": name}})
    page = out / f"{name}.html"
    page.write_text(body, encoding="utf-8")
    return page


def main(argv: list[str]) -> int:
    import nbformat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "build")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell before the notebook is run again")
    parser.add_argument("--tries", type=int, default=2, help="runs per notebook when a cell times out or the kernel dies")
    parser.add_argument("--no-execute", action="store_true", help="render the notebooks as they are")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    install_mathjax(args.out)
    for path in args.notebooks:
        nb = nbformat.read(path, as_version=4)
        if not args.no_execute:
            nb = execute(nb, path, args.timeout, args.tries)
        n = static_widgets(nb)
        page = render(nb, path.stem, args.out)
        print(f"wrote {page} ({n} widget output(s) made static)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
