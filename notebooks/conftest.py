"""Enforce each notebook's smoke-mode time budget when nbval executes it.

nbval turns every code cell into a test item; this hook adds up the time spent executing one
notebook's cells and fails its last cell when the total exceeds UMV2_NOTEBOOK_BUDGET seconds
(default 90, the budget on 2 CPU cores).  Only enforced in smoke mode (UMV2_SMOKE=1).
"""
import os
import time
from collections import defaultdict

import pytest

BUDGET_S = float(os.environ.get("UMV2_NOTEBOOK_BUDGET", "90"))
_spent: dict[str, float] = defaultdict(float)
_last_cell: dict[str, str] = {}


def _notebook_of(item) -> str | None:
    parent = getattr(item, "parent", None)
    return parent.nodeid if parent is not None and parent.nodeid.endswith(".ipynb") else None


def pytest_collection_modifyitems(config, items):
    for item in items:
        nb = _notebook_of(item)
        if nb:
            _last_cell[nb] = item.nodeid


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    nb = _notebook_of(item)
    start = time.perf_counter()
    result = yield
    if nb:
        _spent[nb] += time.perf_counter() - start
        if item.nodeid == _last_cell.get(nb):
            print(f"\n{nb}: cells took {_spent[nb]:.1f} s (budget {BUDGET_S:.0f} s)")
            if os.environ.get("UMV2_SMOKE") == "1" and _spent[nb] > BUDGET_S:
                pytest.fail(f"{nb} took {_spent[nb]:.1f} s in smoke mode, over its {BUDGET_S:.0f} s budget")
    return result
