"""Ahead-of-time compile for Hopper (sm_90a) on CPU: budgets of every kernel in the CI subset.

``python -m kernels.aot --subset ci`` runs once per session in a subprocess (the compiler needs
``TRITON_INTERPRET=0``; this pytest process uses the interpreter).  The subset is every kernel at
bf16, D in {192, 256}, c in {1, 2}, activations none/gelu, and every autotune candidate at the
target shape (D = 192, c = 2); ``make gpu-check`` and ``python -m kernels.aot`` compile the full
matrix (also fp32, D in {64, 128}, relu/silu).  The first tests check the report tool itself on
synthetic input, without compiling.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import aot

ROOT = Path(__file__).resolve().parents[1]
LOOKUP_KERNELS = ("_lookup_fwd_kernel", "_lookup_bwd_token_kernel", "_scatter_atomic_kernel",
                  "_scatter_sorted_kernel", "_scatter_sorted_hot_kernel")


def test_occupancy_limits():
    assert aot.occupancy(128, 0, 4)["ctas_per_sm"] == 4  # 128 regs x 128 threads = 16384 of 65536
    assert aot.occupancy(129, 0, 4)["ctas_per_sm"] == 3  # allocation rounds up to 136 regs
    assert aot.occupancy(255, 0, 4) == dict(ctas_per_sm=2, warps_per_sm=8, limited_by="registers")
    assert aot.occupancy(32, 100_000, 4)["limited_by"] == "shared memory"  # 2 x (100000 + 1024) fit
    assert aot.occupancy(32, 100_000, 4)["ctas_per_sm"] == 2
    assert aot.occupancy(16, 0, 4) == dict(ctas_per_sm=16, warps_per_sm=64, limited_by="threads")


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/              @!P0 LDGSTS.E.BYPASS.128 [R31], desc[UR4][R48.64], P0 ;
        /*0030*/                   REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R6.64], R9 ;
        /*0040*/                   FFMA R8, R4, R5, R8 ;
        /*0050*/               @P1 BRA 0x10 ;
        /*0060*/                   MEMBAR.ALL.GPU ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
"""


def test_sass_loops_and_classes():
    instrs = aot.parse_sass(SASS)
    assert [op for _, op, _ in instrs][:3] == ["LDC", "LDG.E.128", "LDGSTS.E.BYPASS.128"]
    (loop,) = aot.loops(instrs)  # the trailing `BRA 0x80` to itself is not a loop
    assert (loop["start"], loop["end"], loop["instructions"]) == ("0x10", "0x50", 5)
    assert (loop["global_load"], loop["cp_async"], loop["reduction"], loop["fp32_math"], loop["fence"]) == (1, 1, 1, 1, 0)
    assert aot.classify([op for _, op, _ in instrs])["fence"] == 1


def test_budget_violations_are_reported():
    base = dict(signature={"x": "*bf16"}, budget={"max_registers": 128, "min_ctas_per_sm": 4,
                                                   "max_total": {"fence": 0}},
                spill_store_bytes=0, spill_load_bytes=0, registers=120, ctas_per_sm=4, limited_by="registers",
                shared_bytes=0, hot_loop=None, sass_instructions=10, sass_classes={"fence": 0})
    assert aot.violations(base) == []
    bad = dict(base, registers=200, ctas_per_sm=2, spill_store_bytes=8, sass_classes={"fence": 3})
    found = aot.violations(bad)
    assert len(found) == 4 and any("spills 8 bytes at bf16" in v for v in found)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "kernels.aot", "--subset", "ci", "--out", str(out), "--no-fail",
                           "--jobs", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [r for f in sorted(out.glob("*.json")) for r in json.loads(f.read_text())]
    return dict(results=results, log=proc.stdout, summary=(out / "summary.md").read_text())


def _by_kernel(report, kernel):
    rows = [r for r in report["results"] if r["kernel"] == kernel]
    assert rows, f"no {kernel} spec in the CI subset"
    return rows


def test_every_ci_spec_compiled(report):
    want = [s["name"] for s in aot.collect_specs("ci")]
    got = [r["name"] for r in report["results"]]
    assert sorted(got) == sorted(want), "compile errors:\n" + report["summary"]


def test_no_spill_at_bf16(report):
    spilled = [(r["name"], r["spill_store_bytes"] + r["spill_load_bytes"]) for r in report["results"]
               if aot.is_bf16(r) and r["spill_store_bytes"] + r["spill_load_bytes"]]
    assert spilled == []


def test_every_budget_holds(report):
    failed = {r["name"]: r["violations"] for r in report["results"] if r["violations"]}
    assert failed == {}


def test_lookup_kernels_fit_four_ctas_per_sm(report):
    for kernel in LOOKUP_KERNELS:
        for r in _by_kernel(report, kernel):
            if aot.is_bf16(r):
                assert r["ctas_per_sm"] >= 4, (r["name"], r["registers"], r["limited_by"])


def test_atomics_are_relaxed_reductions(report):
    for r in _by_kernel(report, "_scatter_atomic_kernel"):
        ops = r["memory_opcodes"]
        assert any(op.startswith("RED") for op in ops), ops  # fire-and-forget reduction
        assert not any(op.split(".")[0] in ("MEMBAR", "CCTL", "ATOM", "ATOMG") for op in ops), ops


def test_forward_and_backward_gathers_are_pipelined(report):
    for kernel in ("_lookup_fwd_kernel", "_lookup_bwd_token_kernel"):
        for r in _by_kernel(report, kernel):
            if r["num_stages"] > 1:
                assert r["hot_loop"]["cp_async"] > 0, r["name"]  # LDGSTS: gathers issued stages ahead


def test_sorted_path_writes_rows_once_in_table_dtype(report):
    for kernel in ("_scatter_sorted_kernel", "_scatter_sorted_hot_kernel"):
        for r in _by_kernel(report, kernel):
            assert r["signature"]["dv_ptr"] == r["signature"]["g_ptr"]  # bf16 rows, no fp32 buffer
            assert not r["memory_opcodes"], (r["name"], r["memory_opcodes"])  # no atomics, no fences
