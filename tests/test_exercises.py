"""The exercises and their checker.

* every solution (``notebooks/solutions/<name>.py``) is accepted, every registered wrong answer is
  rejected *and named*, every accepted alternative convention is accepted, every stub is "not attempted";
* float32 answers to float64 exercises are accepted, wrong output kinds (float ids, complex, ...) are not;
* the checker never raises for anything a learner's function does, times out endless loops, and
  survives crashes of isolated (forked) runs;
* no notebook shows an exercise's answer before the exercise (and the detector does catch one);
* the grading command works on a stub notebook and on the reference solutions.
"""
from __future__ import annotations

import ctypes
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import torch

import umv2_ref
from umv2_ref.exercises import LOAD_ERRORS, REGISTRY, STATUSES, check, definitions_dir, grade, leaks

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "notebooks" / "solutions"
SOURCES = ROOT / "notebooks" / "src"
NAMES = sorted(REGISTRY)


def load_solution(name: str):
    path = SOLUTIONS / f"{name}.py"
    assert path.exists(), f"exercise {name!r} has no solution file {path}"
    spec = importlib.util.spec_from_file_location(f"solution_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.solution


def source_of(name: str) -> Path:
    return next(SOURCES.glob(f"{REGISTRY[name].notebook}_*.py"))


# ----------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------


def test_registry_covers_every_notebook():
    assert not LOAD_ERRORS, LOAD_ERRORS
    per_notebook = {f"{i:02d}": 0 for i in range(1, 10)}
    for ex in REGISTRY.values():
        per_notebook[ex.notebook] += 1
    assert all(n >= 2 for n in per_notebook.values()), per_notebook
    assert len(REGISTRY) >= 25


def test_definitions_live_outside_the_reference_package():
    engine = Path(umv2_ref.__file__).parent / "exercises"
    assert not list(engine.glob("nb*.py")), "exercise definitions (with wrong formulas) belong in notebooks/exercises"
    assert definitions_dir() == ROOT / "notebooks" / "exercises"
    for ex in REGISTRY.values():
        for mistake in ex.mistakes:
            assert not mistake.fn.__module__.startswith("umv2_ref"), f"{ex.name}: {mistake.name} lives in umv2_ref"


@pytest.mark.parametrize("name", NAMES)
def test_exercise_is_documented(name):
    ex = REGISTRY[name]
    assert ex.goal and "\n" not in ex.goal and len(ex.goal) < 130, "one-line learning goal"
    assert ex.spec and ex.fn_name.isidentifier()
    assert len(ex.mistakes) >= 2
    for m in ex.mistakes:
        assert len(m.hint) >= 40, f"{m.name}: a hint should teach, not just name the mistake"


def test_every_solution_file_belongs_to_an_exercise():
    orphans = [p.stem for p in SOLUTIONS.glob("*.py") if p.stem not in REGISTRY]
    assert not orphans, f"solution files without a registered exercise: {orphans}"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_has_the_stub_the_check_and_the_goal(name):
    ex = REGISTRY[name]
    cells = leaks.percent_cells(source_of(name).read_text())
    at = leaks.exercise_cell(cells, name)
    assert at is not None, f"{source_of(name).name} has no check({name!r}, ...) cell"
    code = cells[at][1]
    assert f"def {ex.fn_name}(" in code and re.search(rf"check\(\"{name}\",\s*{ex.fn_name}\)", code)
    assert "NotImplementedError" in code, "notebooks are committed with the stub, not the answer"
    assert "Goal:" in cells[at - 1][1], "the exercise's Markdown cell states its goal"


def test_unknown_exercise_is_a_key_error():
    with pytest.raises(KeyError, match="unknown exercise"):
        check("nb99_nothing", lambda: None)


# ----------------------------------------------------------------------------------------------
# solutions, known-wrong answers, alternatives, stubs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_solution_is_accepted(name):
    res = check(name, load_solution(name), verbose=False)
    assert res.status == "correct", res.report


@pytest.mark.parametrize("name", NAMES)
def test_known_wrong_answers_are_rejected_and_named(name):
    for mistake in REGISTRY[name].mistakes:
        res = check(name, mistake.fn, verbose=False)
        assert res.status == "mismatch", f"checker accepted known-wrong {mistake.name}:\n{res.report}"
        assert res.mistake == mistake.name, f"{mistake.name} reported as {res.mistake}:\n{res.report}"
        assert mistake.hint in res.report and "spec:" in res.report


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].alternatives])
def test_alternative_conventions_are_accepted(name):
    for alt in REGISTRY[name].alternatives:
        res = check(name, alt.fn, verbose=False)
        assert res.status == "correct" and alt.name in res.message, res.report


@pytest.mark.parametrize("name", NAMES)
def test_stub_reports_not_attempted(name):
    def stub(*args):
        raise NotImplementedError

    assert check(name, stub, verbose=False).status == "not attempted"


def _float64_inputs(name):
    make = REGISTRY[name].make_inputs
    args = make(torch.Generator().manual_seed(0), *((0,) if len(inspect.signature(make).parameters) > 1 else ()))
    return any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args)


def _in_float32(fn):
    def wrapped(*args):
        return fn(*(a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float64 else a for a in args))
    return wrapped


@pytest.mark.parametrize("name", [n for n in NAMES if _float64_inputs(n)])
def test_float32_answers_to_float64_exercises(name):
    """Right in float32: accepted at float32's tolerance.  Wrong in float32: still rejected."""
    res = check(name, _in_float32(load_solution(name)), verbose=False)
    assert res.status == "correct", res.report
    for mistake in REGISTRY[name].mistakes:
        if mistake.rule is None:
            assert check(name, _in_float32(mistake.fn), verbose=False).status == "mismatch", mistake.name


def test_lr_schedule_in_float32_and_the_cosine_phase():
    """The review's cases: a float32 schedule is right; progress t/total is named, not a bare diff."""
    solution = load_solution("nb06_lr_schedule")

    def in_float32(steps, total, warmup, base_lr, start):
        return tuple(t.float() for t in solution(steps, total, warmup, base_lr, start))

    assert check("nb06_lr_schedule", in_float32, verbose=False).status == "correct"
    res = check("nb06_lr_schedule", REGISTRY["nb06_lr_schedule"].mistakes[3].fn, verbose=False)
    assert res.mistake == "cosine_progress_over_total" and "after the warmup" in res.hint


# ----------------------------------------------------------------------------------------------
# output kinds and a checker that never raises
# ----------------------------------------------------------------------------------------------


def _topk(s_row, s_col, k):
    return load_solution("nb01_product_key_topk")(s_row, s_col, k)


def test_float_ids_are_refused_even_when_they_round_right():
    res = check("nb01_product_key_topk", lambda *a: (_topk(*a)[0], _topk(*a)[1].float() + 0.4), verbose=False)
    assert res.status == "mismatch" and "expects integers" in res.message and "float32" in res.message


def test_complex_outputs_are_refused():
    res = check("nb01_product_key_topk", lambda *a: (_topk(*a)[0].to(torch.complex64), _topk(*a)[1]), verbose=False)
    assert res.status == "mismatch" and "complex" in res.message


def test_int32_ids_and_a_list_are_accepted():
    assert check("nb01_product_key_topk", lambda *a: [_topk(*a)[0], _topk(*a)[1].int()], verbose=False).ok


def test_python_int_expected():
    solution = load_solution("nb03_v2_macs")
    res = check("nb03_v2_macs", lambda *a: float(solution(*a)), verbose=False)
    assert res.status == "mismatch" and "Python int" in res.message
    res = check("nb03_v2_macs", lambda *a: torch.tensor(solution(*a)), verbose=False)
    assert res.status == "mismatch" and "int(...)" in res.message


def test_lower_precision_is_named():
    res = check("nb01_product_key_topk", lambda *a: (_topk(*a)[0].half(), _topk(*a)[1]), verbose=False)
    assert res.status == "mismatch" and "you returned float16; this exercise expects float32" in res.message


class _Hostile:
    def __eq__(self, other):
        raise RuntimeError("no comparing me")

    def __len__(self):
        raise RuntimeError("no len either")

    def __repr__(self):
        raise RuntimeError("nor repr")


@pytest.mark.parametrize("answer", [
    None, "a string", 3.5, {"scores": 1}, _Hostile(), (x for x in range(2)), (None, None), ((1, 2), 3),
    torch.empty(0), torch.zeros(2, 3, device="meta"), torch.eye(3).to_sparse(), torch.randn(3, requires_grad=True),
    __import__("numpy").zeros((2, 2)), ValueError("returned, not raised"),
], ids=lambda a: type(a).__name__)
def test_check_never_raises_on_odd_returns(answer):
    res = check("nb01_product_key_topk", lambda *a: answer, verbose=False)
    assert res.status == "mismatch" and res.message


def test_check_never_raises_on_odd_behaviour():
    def exits(*a):
        sys.exit(3)

    def recurses(*a):
        return recurses(*a)

    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no str")

    def raises_unprintable(*a):
        raise Unprintable()

    assert check("nb01_product_key_topk", exits, verbose=False).status == "mismatch"
    res = check("nb01_product_key_topk", raises_unprintable, verbose=False)
    assert res.status == "mismatch" and "Unprintable" in res.message
    res = check("nb01_product_key_topk", recurses, verbose=False)
    assert res.status == "mismatch" and "RecursionError" in res.message
    assert check("nb01_product_key_topk", 42, verbose=False).status == "mismatch"


def test_mismatch_report_shows_spec_entries_and_the_learners_frame(capsys):
    def buggy(s_row, s_col, k):
        top_r, idx_r = s_row.topk(k, dim=-1)
        return top_r, idx_r[:, k + 100]  # an IndexError in the learner's own line

    res = check("nb01_product_key_topk", buggy)
    printed = capsys.readouterr().out
    assert res.status == "mismatch" and "IndexError" in res.message
    assert "idx_r[:, k + 100]" in printed and "spec:" in printed and "tolerance:" in printed
    res = check("nb01_product_key_topk", REGISTRY["nb01_product_key_topk"].mistakes[0].fn)
    printed = capsys.readouterr().out
    assert "got" in printed and "expected" in printed and "at (" in printed  # first differing entries


def test_result_object_and_its_display(capsys):
    res = check("nb05_gain_rescale", load_solution("nb05_gain_rescale"))
    assert res.status == "correct" and res.ok and res.mistake is None and res.trials == 4
    assert capsys.readouterr().out.strip() == res.report == str(res)
    res._ipython_display_()  # outside IPython: prints the report again when displayed
    assert res.report in capsys.readouterr().out
    assert set(STATUSES) == {"correct", "not attempted", "mismatch", "timeout", "crashed"}


# ----------------------------------------------------------------------------------------------
# timeouts and crashes
# ----------------------------------------------------------------------------------------------


def _endless(*args):
    while True:
        pass


def _stubborn(*args):
    try:
        while True:
            pass
    except BaseException:  # swallows the first timeout: the checker must fire again
        pass
    while True:
        pass


def _unstoppable(*args):
    while True:
        try:
            while True:
                pass
        except BaseException:  # a bare `except:` in an endless loop eats every interrupt
            pass


@pytest.mark.parametrize("fn", [_endless, _stubborn])
def test_endless_loop_times_out_in_process(fn):
    start = time.monotonic()
    res = check("nb05_gain_rescale", fn, verbose=False, timeout=1.0)
    assert res.status == "timeout" and "1 s" in res.message
    assert time.monotonic() - start < 10


def test_timeout_keeps_an_outer_alarm():
    import signal

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 2.5)
        check("nb05_gain_rescale", _endless, verbose=False, timeout=0.5)
        time.sleep(2.5)
        assert fired, "the alarm set before check() must still fire"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_endless_loop_times_out_in_a_thread():
    import threading

    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("r", check("nb05_gain_rescale", _endless,
                                                                       verbose=False, timeout=1.0)))
    worker.start()
    worker.join(20)
    assert box["r"].status == "timeout"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_isolated_run_times_out_and_reaps_the_child():
    res = check("nb05_gain_rescale", _unstoppable, verbose=False, timeout=1.0, isolate=True)
    assert res.status == "timeout"
    try:
        assert os.waitpid(-1, os.WNOHANG)[0] == 0, "a killed child was left unreaped"
    except ChildProcessError:  # no child at all: the killed one was reaped
        pass


def _aborts(*args):
    os.abort()


def _segfaults(*args):
    return ctypes.string_at(0)


def _exits_hard(*args):
    os._exit(3)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("fn, signal_name", [(_aborts, "SIGABRT"), (_segfaults, "SIGSEGV"), (_exits_hard, "code 3")])
def test_isolated_crash_is_reported_not_fatal(fn, signal_name):
    res = check("nb05_gain_rescale", fn, verbose=False, isolate=True)
    assert res.status == "crashed" and signal_name in res.message, res.report


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_isolated_run_returns_outputs_and_prints():
    solution = load_solution("nb05_gain_rescale")

    def chatty(*args):
        print("hello from the child")
        return solution(*args)

    res = check("nb05_gain_rescale", chatty, verbose=False, isolate=True)
    assert res.status == "correct" and "hello from the child" in res.report


def test_triton_exercise_crash_gets_the_mask_hint():
    res = check("nb07_gather_kernel", _segfaults, verbose=False)  # the Triton exercise is isolated by default
    assert res.status == "crashed" and "mask" in res.hint


@pytest.mark.interpret
def test_unmasked_triton_kernel_cannot_kill_the_caller():
    """The review's case: a gather kernel without its tail mask.  Whatever it does, we survive."""
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    import triton
    import triton.language as tl

    @triton.jit
    def unmasked(table_ptr, idx_ptr, g_ptr, dw_ptr, T, K, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # no t < T anywhere
        d = tl.arange(0, BLOCK_D)
        g = tl.load(g_ptr + t[:, None] * D + d[None, :])
        for k in range(K):
            row = tl.load(idx_ptr + t * K + k)
            v = tl.load(table_ptr + row[:, None] * D + d[None, :])
            tl.store(dw_ptr + t * K + k, tl.sum(v * g, axis=1))

    def launcher(table, idx, g):
        T, K = idx.shape
        dw = torch.empty(T, K)
        unmasked[(triton.cdiv(T, 4),)](table, idx, g, dw, T, K, table.shape[1], BLOCK_T=4,
                                       BLOCK_D=triton.next_power_of_2(table.shape[1]))
        return dw

    res = check("nb07_gather_kernel", launcher, verbose=False)
    assert res.status in ("crashed", "mismatch"), res.report


# ----------------------------------------------------------------------------------------------
# no answer before its exercise
# ----------------------------------------------------------------------------------------------


def test_no_exercise_answer_appears_before_the_exercise():
    found = []
    for src in sorted(SOURCES.glob("[0-9][0-9]_*.py")):
        found += leaks.find_leaks(src, [ex for ex in REGISTRY.values() if ex.notebook == src.name[:2]], SOLUTIONS)
    assert not found, "\n".join(f"{f.exercise}: {f.kind}: {f.detail}" for f in found)


@pytest.mark.parametrize("name", NAMES)
def test_leak_detector_catches_the_solution_pasted_above(name, tmp_path):
    """Each exercise's fingerprints describe its solution, and a pasted solution is found."""
    ex = REGISTRY[name]
    solution_text = (SOLUTIONS / f"{name}.py").read_text()
    assert any(re.search(p, solution_text) for p in ex.fingerprints), f"{name}: no fingerprint matches the solution"
    cells = leaks.percent_cells(source_of(name).read_text())
    at = leaks.exercise_cell(cells, name)
    pasted = cells[:at] + [("code", solution_text)] + cells[at:]
    leaky = tmp_path / source_of(name).name
    leaky.write_text("\n".join(f"# %% [markdown]\n{t}" if k == "markdown" else f"# %%\n{t}" for k, t in pasted))
    assert leaks.find_leaks(leaky, [ex], SOLUTIONS), f"{name}: a pasted solution went unnoticed"


# ----------------------------------------------------------------------------------------------
# grading
# ----------------------------------------------------------------------------------------------


def test_grade_solutions_all_correct(tmp_path, capsys):
    table = tmp_path / "grades.csv"
    assert grade.main(["--solutions", "--csv", str(table)]) == 0
    out = capsys.readouterr().out
    assert f"correct {len(REGISTRY)}," in out
    rows = table.read_text().splitlines()[1:]
    assert len(rows) == len(REGISTRY) and all(",correct," in r for r in rows)


@pytest.mark.notebook
def test_grade_stub_notebook(tmp_path):
    """A tiny notebook with the stubs of notebook 05: executed headless, every exercise not attempted."""
    stubs = [nbformat.v4.new_code_cell("from umv2_ref.exercises import check")]
    for name in sorted(n for n in REGISTRY if REGISTRY[n].notebook == "05"):
        fn = REGISTRY[name].fn_name
        stubs.append(nbformat.v4.new_code_cell(f"def {fn}(*args):\n    raise NotImplementedError\n\n\n"
                                               f"check({name!r}, {fn})"))
    nb = nbformat.v4.new_notebook(cells=stubs)
    path = tmp_path / "05_student.ipynb"
    nbformat.write(nb, path)
    table = tmp_path / "grades.csv"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "umv2_ref.exercises.grade", str(path), "--csv", str(table)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = table.read_text().splitlines()[1:]
    assert len(rows) == 3 and all(",not attempted," in r for r in rows), rows
    assert "not attempted 3" in result.stdout
