"""Compile every kernel for Hopper (sm_90a) on a machine without a GPU and report what ptxas made of it.

    python -m kernels.aot                       # full matrix -> kernels/aot_report/
    python -m kernels.aot --subset ci --out build/aot   # the representative subset CI checks

For each specialisation a kernel module declares in ``aot_specs()`` (``kernels.lookup`` and
``kernels.topk``; see :func:`collect_specs`), this

1. runs Triton's full compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin) for
   ``GPUTarget("cuda", 90, 64)``, with the 16-byte divisibility hints the JIT would attach;
2. reads registers / shared memory from the cubin (``cuobjdump -res-usage``), spill bytes from the
   wheel's own ``ptxas -v --gpu-name=sm_90a`` on the PTX, and the SASS (``cuobjdump -sass``);
3. counts static SASS instructions: the whole kernel and its *hot loop* (the backward-branch loop
   with the most global-memory instructions), by class (global loads, ``cp.async`` = LDGSTS,
   stores, reductions/atomics, fences, barriers, shared-memory traffic, FP32 math);
4. computes resident CTAs per SM from registers, shared memory and threads (H100 limits);
5. checks each spec's ``budget`` and, for bf16 specs, that nothing spills.

Only the triton wheel's ``ptxas`` / ``cuobjdump`` are used (no CUDA toolkit).  Static counts and
occupancy are facts about the binary; any time derived from them is an estimate.

Writes ``<kernel>.json`` and ``<kernel>.md`` per @triton.jit function and ``summary.md`` into
``--out``.  Exit status 1 if a budget fails (``--no-fail`` to only report).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and os.environ.get("TRITON_INTERPRET") != "0":
    # `python -m kernels.aot` imports the package first, which picks the interpreter on a CPU-only
    # machine; the compiler needs the real @triton.jit objects, so start over without it.
    os.environ["TRITON_INTERPRET"] = "0"
    os.execv(sys.executable, [sys.executable, "-m", "kernels.aot", *sys.argv[1:]])

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
import multiprocessing  # noqa: E402
from pathlib import Path  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 64)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
DEFAULT_OUT = Path(__file__).with_name("aot_report")

# H100 / H200 (sm_90) per-SM limits used for occupancy.
SM90 = dict(regs=65536, reg_unit=256, smem=233472, smem_per_cta_reserved=1024, threads=2048, ctas=32)

MEMORY_ORDER_OPS = ("RED", "REDG", "ATOM", "ATOMG", "MEMBAR", "FENCE", "CCTL")  # listed verbatim in the report

# SASS opcode classes counted in each loop (first word of the opcode, predicates stripped).
CLASSES = {
    "global_load": ("LDG",),
    "cp_async": ("LDGSTS",),
    "global_store": ("STG",),
    "reduction": ("RED", "REDG"),
    "atomic": ("ATOM", "ATOMG"),
    "fence": ("MEMBAR", "FENCE"),
    "cache_invalidate": ("CCTL",),
    "barrier": ("BAR",),
    "shared_load": ("LDS", "LDSM"),
    "shared_store": ("STS",),
    "shuffle": ("SHFL",),
    "fp32_math": ("FFMA", "FMUL", "FADD", "FMNMX"),
}


# ---------------------------------------------------------------------------------------------
# collecting specs
# ---------------------------------------------------------------------------------------------


def collect_specs(subset: str = "full") -> list[dict]:
    """Every module's ``aot_specs()``; ``subset="ci"`` keeps specs whose optional ``ci`` is not False."""
    import kernels.lookup
    import kernels.topk

    specs = []
    for module in (kernels.lookup, kernels.topk):
        if not hasattr(module, "aot_specs"):
            print(f"note: {module.__name__} has no aot_specs(); skipped")
            continue
        specs += module.aot_specs()
    names = [s["name"] for s in specs]
    dup = [n for n, k in Counter(names).items() if k > 1]
    if dup:
        raise ValueError(f"aot spec names must be unique; repeated: {dup}")
    return [s for s in specs if subset == "full" or s.get("ci", True)]


# ---------------------------------------------------------------------------------------------
# compiling one spec and reading the binary
# ---------------------------------------------------------------------------------------------


def _run(tool: str, *args: str) -> str:
    out = subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, check=True)
    return out.stdout + out.stderr


def ptxas_stats(ptx: str) -> dict:
    """Registers, spill bytes and stack frame from ``ptxas -v`` (the same flags Triton uses)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        log = _run("ptxas", "-v", "--gpu-name=sm_90a", str(src), "-o", str(Path(tmp) / "k.cubin"))
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return dict(ptxas_registers=int(regs.group(1)), spill_store_bytes=int(spill.group(1)),
                spill_load_bytes=int(spill.group(2)), stack_bytes=int(stack.group(1)))


def cubin_usage(cubin: bytes) -> tuple[dict, str]:
    """(``cuobjdump -res-usage`` fields, SASS text) of Triton's own cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        usage, sass = _run("cuobjdump", "-res-usage", str(path)), _run("cuobjdump", "-sass", str(path))
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {k.lower(): int(v) for k, v in fields.items()}, sass


SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) for every instruction."""
    return [(int(a, 16), op, rest) for a, op, rest in SASS_LINE.findall(sass)]


def classify(ops: list[str]) -> dict:
    counts = {name: 0 for name in CLASSES}
    for op in ops:
        head = op.split(".")[0]
        for name, prefixes in CLASSES.items():
            if head in prefixes:
                counts[name] += 1
    return counts


def loops(instrs: list[tuple[int, str, str]]) -> list[dict]:
    """Backward branches ``BRA <lower address>`` delimit loops: [target, branch]."""
    found = []
    for addr, op, rest in instrs:
        target = re.search(r"0x([0-9a-f]+)", rest)
        if op.startswith("BRA") and target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            body = [o for a, o, _ in instrs if start <= a <= addr]
            found.append(dict(start=hex(start), end=hex(addr), instructions=len(body), **classify(body)))
    return found


def hot_loop(found: list[dict]) -> dict | None:
    """The loop that moves the data: most global-memory instructions, then the longest."""
    if not found:
        return None
    mem = ("global_load", "cp_async", "global_store", "reduction", "atomic")
    return max(found, key=lambda lp: (sum(lp[k] for k in mem), lp["instructions"]))


def occupancy(regs: int, smem: int, num_warps: int) -> dict:
    """Resident CTAs per SM on sm_90 and which resource limits it."""
    per_warp = -(-regs * 32 // SM90["reg_unit"]) * SM90["reg_unit"]
    limits = {
        "registers": SM90["regs"] // (per_warp * num_warps) if regs else SM90["ctas"],
        "shared memory": SM90["smem"] // (smem + SM90["smem_per_cta_reserved"]),
        "threads": SM90["threads"] // (32 * num_warps),
        "CTA slots": SM90["ctas"],
    }
    ctas = min(limits.values())
    return dict(ctas_per_sm=ctas, warps_per_sm=ctas * num_warps, limited_by=min(limits, key=limits.get))


def compile_spec(spec: dict) -> dict:
    """Compile one spec for sm_90a and measure it (runs in a worker process)."""
    fn = spec["fn"]
    names = fn.arg_names
    signature = {n: spec["signature"].get(n, "constexpr") for n in names}
    divisible = spec.get("divisible_by_16", [n for n, t in spec["signature"].items() if t.startswith("*")])
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn, signature, constexprs=dict(spec["constexprs"]), attrs=attrs)
    t0 = time.perf_counter()
    kernel = triton.compile(src, target=TARGET, options=dict(num_warps=spec["num_warps"],
                                                             num_stages=spec["num_stages"]))
    seconds = time.perf_counter() - t0
    usage, sass = cubin_usage(kernel.asm["cubin"])
    stats = ptxas_stats(kernel.asm["ptx"])
    instrs = parse_sass(sass)
    found = loops(instrs)
    smem = kernel.metadata.shared  # dynamic shared memory the launch requests
    result = dict(
        name=spec["name"], kernel=fn.__name__, note=spec.get("note", ""),
        num_warps=spec["num_warps"], num_stages=spec["num_stages"],
        constexprs={k: str(v) for k, v in spec["constexprs"].items()},
        signature=spec["signature"], budget=spec.get("budget", {}),
        registers=usage["reg"], local_bytes=usage.get("local", 0), shared_bytes=smem, **stats,
        **occupancy(usage["reg"], smem, spec["num_warps"]),
        sass_instructions=len(instrs), sass_classes=classify([op for _, op, _ in instrs]),
        memory_opcodes=sorted({op for _, op, _ in instrs if op.split(".")[0] in MEMORY_ORDER_OPS}),
        loops=found, hot_loop=hot_loop(found), compile_seconds=round(seconds, 2),
    )
    result["violations"] = violations(result)
    return result


def is_bf16(result: dict) -> bool:
    return any(t == "*bf16" for t in result["signature"].values())


def violations(r: dict) -> list[str]:
    """Budget failures of one compiled spec (empty list: all good)."""
    out = []
    b = r["budget"]
    spill = r["spill_store_bytes"] + r["spill_load_bytes"]
    if is_bf16(r) and spill:
        out.append(f"spills {spill} bytes at bf16")
    if "max_spill_bytes" in b and spill > b["max_spill_bytes"]:
        out.append(f"spills {spill} bytes > {b['max_spill_bytes']}")
    if "max_registers" in b and r["registers"] > b["max_registers"]:
        out.append(f"{r['registers']} registers > {b['max_registers']}")
    if "min_ctas_per_sm" in b and r["ctas_per_sm"] < b["min_ctas_per_sm"]:
        out.append(f"{r['ctas_per_sm']} CTAs/SM < {b['min_ctas_per_sm']} (limited by {r['limited_by']})")
    if "max_shared_bytes" in b and r["shared_bytes"] > b["max_shared_bytes"]:
        out.append(f"{r['shared_bytes']} B shared > {b['max_shared_bytes']}")
    for cls, limit in b.get("max_hot_loop", {}).items():
        got = (r["hot_loop"] or {}).get(cls, 0)
        if got > limit:
            out.append(f"hot loop {cls} = {got} > {limit}")
    for cls, least in b.get("min_hot_loop", {}).items():
        got = (r["hot_loop"] or {}).get(cls, 0)
        if got < least:
            out.append(f"hot loop {cls} = {got} < {least}")
    for cls, limit in b.get("max_total", {}).items():
        got = r["sass_instructions"] if cls == "instructions" else r["sass_classes"].get(cls, 0)
        if got > limit:
            out.append(f"kernel {cls} = {got} > {limit}")
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

COLUMNS = ("spec", "warps", "stages", "regs", "spill B", "smem KB", "CTAs/SM (limit)", "SASS", "hot loop",
           "LDG", "LDGSTS", "STG", "RED/ATOM", "MEMBAR", "BAR", "budget")


def _row(r: dict) -> str:
    h = r["hot_loop"] or {k: 0 for k in ("instructions", *CLASSES)}
    spill = r["spill_store_bytes"] + r["spill_load_bytes"]
    status = "ok" if not r["violations"] else "FAIL: " + "; ".join(r["violations"])
    cells = (r["name"], r["num_warps"], r["num_stages"], r["registers"], spill, f"{r['shared_bytes'] / 1024:.1f}",
             f"{r['ctas_per_sm']} ({r['limited_by']})", r["sass_instructions"], h["instructions"],
             h["global_load"], h["cp_async"], h["global_store"], h["reduction"] + h["atomic"],
             h["fence"], h["barrier"], status)
    return "| " + " | ".join(str(c) for c in cells) + " |"


def kernel_markdown(kernel: str, results: list[dict]) -> str:
    notes = sorted({r["note"] for r in results if r["note"]})
    lines = [f"# `{kernel}` compiled for sm_90a (triton {triton.__version__}, ahead of time, no GPU)", "",
             "Static facts about the binary (registers, spills, shared memory, SASS instruction counts); "
             "CTAs/SM from the H100 limits. Hot loop: the backward-branch loop with the most global-memory "
             "instructions (counts are per warp, per iteration).", ""]
    lines += [f"* {n}" for n in notes] + ([""] if notes else [])
    lines += ["| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    lines += [_row(r) for r in results]
    return "\n".join(lines) + "\n"


def summary_markdown(results: list[dict], subset: str, wall: float) -> str:
    by_kernel: dict[str, list[dict]] = {}
    for r in results:
        by_kernel.setdefault(r["kernel"], []).append(r)
    lines = [f"# AOT compile report (sm_90a, triton {triton.__version__}, subset `{subset}`)", "",
             f"{len(results)} specialisations compiled in {wall:.0f} s wall. Per kernel: worst case over its specs.",
             "", "| kernel | specs | max regs | max spill B (bf16 / all) | min CTAs/SM | max smem KB "
             "| budget failures |", "|---" * 7 + "|"]
    for kernel, rs in by_kernel.items():
        spill_bf16 = max([r["spill_store_bytes"] + r["spill_load_bytes"] for r in rs if is_bf16(r)], default=0)
        spill_all = max(r["spill_store_bytes"] + r["spill_load_bytes"] for r in rs)
        fails = sum(bool(r["violations"]) for r in rs)
        lines.append(f"| `{kernel}` | {len(rs)} | {max(r['registers'] for r in rs)} | {spill_bf16} / {spill_all} "
                     f"| {min(r['ctas_per_sm'] for r in rs)} | {max(r['shared_bytes'] for r in rs) / 1024:.1f} "
                     f"| {fails} |")
    return "\n".join(lines) + "\n"


def write_report(results: list[dict], out: Path, subset: str, wall: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    errors = [r for r in results if "error" in r]
    results = [r for r in results if "error" not in r]
    by_kernel: dict[str, list[dict]] = {}
    for r in results:
        by_kernel.setdefault(r["kernel"], []).append(r)
    for kernel, rs in by_kernel.items():
        (out / f"{kernel}.json").write_text(json.dumps(rs, indent=1) + "\n")
        (out / f"{kernel}.md").write_text(kernel_markdown(kernel, rs))
    failures = [f"* compile error in `{r['name']}`: {r['error'].splitlines()[0]}" for r in errors]
    (out / "summary.md").write_text(summary_markdown(results, subset, wall) + "\n".join(failures))


_SPECS: list[dict] = []  # set before the worker processes fork (JIT functions do not pickle)


def _compile_safe(i: int) -> dict:
    spec = _SPECS[i]
    try:
        return compile_spec(spec)
    except Exception as err:  # report the failure as a violation, keep compiling the rest
        return dict(name=spec["name"], kernel=spec["fn"].__name__, error=f"{type(err).__name__}: {err}"[:2000],
                    violations=[f"compile failed: {type(err).__name__}"])


def run(subset: str = "full", out: Path = DEFAULT_OUT, jobs: int | None = None, only: str = "") -> list[dict]:
    """Compile the specs (``only``: substring filter on names) in ``jobs`` processes and write the report."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernels.aot compiles real kernels: run it as `python -m kernels.aot` "
                           "(or with TRITON_INTERPRET=0 set before triton is imported)")
    _SPECS[:] = [s for s in collect_specs(subset) if only in s["name"]]
    t0 = time.perf_counter()
    jobs = jobs or os.cpu_count() or 1
    results = []
    own_cache = "TRITON_CACHE_DIR" not in os.environ  # cold compiles unless the caller chose a cache
    with tempfile.TemporaryDirectory(prefix="umv2-aot-cache-") as cache:
        if own_cache:
            os.environ["TRITON_CACHE_DIR"] = cache
        try:
            results = _compile_all(jobs)
        finally:
            if own_cache:
                del os.environ["TRITON_CACHE_DIR"]
    wall = time.perf_counter() - t0
    write_report(results, out, subset, wall)
    for r in results:
        if "error" in r:
            print(f"compile error in {r['name']}: {r['error']}")
    print(f"{len(results)} specs in {wall:.0f} s ({jobs} processes); report in {out}")
    return results


def _compile_all(jobs: int) -> list[dict]:
    results = []
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        for i, r in enumerate(pool.imap(_compile_safe, range(len(_SPECS))), 1):
            results.append(r)
            flag = "ok" if not r["violations"] else "FAIL " + "; ".join(r["violations"])
            print(f"[{i:3d}/{len(_SPECS)}] {r['name']:58s} regs {r.get('registers', '?'):>4}  "
                  f"CTAs/SM {r.get('ctas_per_sm', '?')}  {flag}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", choices=("full", "ci"), default="full")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--jobs", type=int, default=None, help="compiler processes (default: all cores)")
    parser.add_argument("--only", default="", help="compile only specs whose name contains this")
    parser.add_argument("--no-fail", action="store_true", help="exit 0 even if a budget fails")
    args = parser.parse_args(argv)
    results = run(args.subset, args.out, args.jobs, args.only)
    bad = [r for r in results if r["violations"]]
    for r in bad:
        print(f"BUDGET {r['name']}: {'; '.join(r['violations'])}")
    return 0 if (not bad or args.no_fail) else 1


if __name__ == "__main__":
    sys.exit(main())
