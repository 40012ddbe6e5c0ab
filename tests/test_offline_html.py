"""`make notebooks` writes HTML that needs no network: local MathJax, widgets as their default view.

Renders (and executes) a tiny notebook with an equation and an ipywidgets control through
tools/render_html.py, the script `make notebooks` runs.  That the local MathJax really typesets the
equations offline is checked in a browser by tests/test_browser.py.
"""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import build_notebooks  # noqa: E402
import render_html  # noqa: E402

SOURCE = r"""# %% [markdown]
# # Offline page
# Inline $s_{row}[i] + s_{col}[j]$ and displayed $$o = W^\top V^\top \hat s .$$
# %%
import matplotlib.pyplot as plt
from ipywidgets import interact


def show(k=2):
    plt.plot([0, k], [0, k])
    plt.show()


interact(show, k=(1, 5));
"""

NETWORK = re.compile(r"""(?:src|href)\s*=\s*["']\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//|@import\s+["']?(?:https?:)?//""",
                     re.I)


def test_page_loads_nothing_from_the_network_and_typesets_with_local_mathjax(tmp_path):
    nb_path = tmp_path / "01_offline.ipynb"
    nb_path.write_text(build_notebooks.build_text(SOURCE))
    out = tmp_path / "build"
    assert render_html.main([str(nb_path), "--out", str(out), "--timeout", "300"]) == 0
    page = (out / "01_offline.html").read_text()
    assert not NETWORK.findall(page), NETWORK.findall(page)[:5]
    assert f'src="{render_html.MATHJAX_URL}"' in page
    assert (out / "mathjax" / "MathJax.js").is_file() and (out / "mathjax" / "config" / "TeX-AMS-MML_HTMLorMML-full.js").is_file()
    assert 'webFont: "STIX-Web"' in page and any((out / "mathjax" / "fonts" / "HTML-CSS" / "STIX-Web").rglob("*.woff"))
    assert r"s_{row}[i] + s_{col}[j]" in page  # left for MathJax, inside the inline delimiters it is told about
    # the widget: no renderer, no widget state; its default view is a static image under a note
    assert "widget-view+json" not in page and "widget-state+json" not in page and "require" not in page.lower()
    note = page.index("Interactive control (ipywidgets)")
    assert "data:image/png;base64," in page[note:], "the control's default view (its first figure) is missing"


def test_a_notebook_that_stalls_once_is_run_again_in_a_fresh_kernel(tmp_path, capsys):
    """A cell past --timeout (or a dead kernel) reruns the notebook: a stall once is not a failed build."""
    import nbformat

    nb_path = tmp_path / "01_stall.ipynb"
    nb_path.write_text(build_notebooks.build_text(
        "# %%\nimport pathlib, time\nfirst = not pathlib.Path('ran-once').exists()\n"
        "pathlib.Path('ran-once').write_text('x')\ntime.sleep(60 if first else 0)\nprint('first run' if first else 'second run')\n"))
    done = render_html.execute(nbformat.read(nb_path, as_version=4), nb_path, timeout=5, tries=2)
    assert [o["text"] for o in done.cells[0]["outputs"]] == ["second run\n"]
    assert "CellTimeoutError" in capsys.readouterr().err
    (tmp_path / "ran-once").unlink()  # stalls again; with one try the timeout is the answer, not a page
    with pytest.raises(Exception, match="(?i)timed out|timeout"):
        render_html.execute(nbformat.read(nb_path, as_version=4), nb_path, timeout=5, tries=1)
