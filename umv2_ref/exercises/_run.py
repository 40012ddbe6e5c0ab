"""Run a learner's function on the trial inputs: timeouts, method rules, crash isolation.

* **Timeout.**  In the main thread a ``SIGALRM`` timer interrupts a Python-level loop (the previous
  timer, e.g. pytest-timeout's, is restored afterwards); elsewhere the function runs in a daemon
  thread that is asked to stop.  Either way the check reports ``"timeout"`` instead of hanging.
* **Isolation.**  With ``isolate=True`` (the Triton exercises) the function runs in a *forked* child
  process.  The child inherits the function as it is -- closures, globals, the Triton kernel it
  launches -- so nothing has to be pickled except the outputs it sends back.  A segfault or an abort
  kills only the child; the parent reports ``"crashed"``.  Fork is refused when CUDA is initialised
  (a forked child cannot use it); then the function runs in this process and the report says so.
* **Method rules.**  While the function runs, a ``TorchDispatchMode`` records every aten op and every
  newly allocated tensor, and a profile hook records calls of forbidden Python functions and Triton
  launches.  :class:`Rule` turns these observations into violations.
"""
from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import io
import os
import pickle
import select
import signal
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ._compare import to_cpu

_HARNESS_DIR = os.path.dirname(os.path.abspath(__file__))


class _Timeout(BaseException):
    """Raised inside the learner's code when its time is up (BaseException: `except Exception` cannot eat it)."""


# ----------------------------------------------------------------------------------------------
# Method rules
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A method constraint.  ``kind`` is one of

    * ``"no_calls"``: none of ``calls`` (Python functions, e.g. the package's own implementation) may run
      (with ``when``: no call whose arguments -- the callee's locals at entry -- satisfy ``when``);
    * ``"no_ops"``: none of the aten ops named in ``ops`` may run (``"index_put_accumulate"`` stands for
      ``index_put_(..., accumulate=True)`` and ``put_(..., accumulate=True)``, ``"sort_stable"`` for a
      sort with ``stable=True``);
    * ``"needs_ops"``: at least one of ``ops`` must run;
    * ``"no_alloc"``: ``alloc(args)`` returns a predicate on tensors; no tensor the function allocates
      may satisfy it (views of existing storage do not count);
    * ``"needs_triton"``: at least one Triton kernel must be launched;
    * ``"op_count_fixed"``: the number of aten ops must not grow with ``size(args)`` across trials
      (a Python loop over that size shows up as at least one extra op per step).
    """

    kind: str
    text: str  # what the rule demands, as printed in the report
    calls: tuple = ()
    ops: frozenset = frozenset()
    alloc: Callable[[tuple], Callable[[torch.Tensor], bool]] | None = None
    size: Callable[[tuple], int] | None = None
    when: Callable[[dict], bool] | None = None


_ACCUMULATING_PUT = {"index_put_", "index_put", "_index_put_impl_", "_index_put_impl", "put_", "put"}


class _OpTracker(TorchDispatchMode):
    """Records the aten ops that run and which allocation predicates fire."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # nothing is compiled here; wrapping would import torch._dynamo (seconds) on first use

    def __init__(self, predicates: list[tuple[int, Callable[[torch.Tensor], bool]]]):
        super().__init__()
        self.ops: set[str] = set()
        self.count = 0
        self.alloc_hits: set[int] = set()
        self.predicates = predicates

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:  # bookkeeping only: a problem here must never be blamed on the learner's code
            self._record(func, args, kwargs, out)
        except Exception:
            pass
        return out

    def _record(self, func, args, kwargs, out) -> None:
        name = func.overloadpacket.__name__
        self.ops.add(name)
        self.count += 1
        if name in _ACCUMULATING_PUT and kwargs.get("accumulate", args[3] if len(args) > 3 else False) is True:
            self.ops.add("index_put_accumulate")
        if name == "sort" and kwargs.get("stable", args[1] if len(args) > 1 and isinstance(args[1], bool)
                                         else False) is True:
            self.ops.add("sort_stable")
        if self.predicates:
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.numel() > 1 and t.untyped_storage().data_ptr() not in inputs:
                    for i, pred in self.predicates:
                        if pred(t):
                            self.alloc_hits.add(i)


def _triton_runtime_dir() -> str | None:
    mod = sys.modules.get("triton")
    if mod is None or not getattr(mod, "__file__", None):
        return None
    return os.path.join(os.path.dirname(os.path.abspath(mod.__file__)), "runtime")


def _safe_when(when: Callable[[dict], bool], arguments: dict) -> bool:
    try:
        return bool(when(arguments))
    except Exception:
        return False


@contextlib.contextmanager
def _watch(rules: tuple[Rule, ...], args: tuple):
    """Context that yields a function returning the indices of violated rules."""
    codes: dict[Any, int] = {}
    triton_rules = [i for i, r in enumerate(rules) if r.kind == "needs_triton"]
    for i, r in enumerate(rules):
        if r.kind == "no_calls":
            for f in r.calls:
                code = getattr(getattr(f, "__wrapped__", f), "__code__", None)
                if code is not None:
                    codes[code] = i
    preds = [(i, r.alloc(args)) for i, r in enumerate(rules) if r.kind == "no_alloc"]
    need_ops = any(r.kind in ("no_ops", "needs_ops", "op_count_fixed") for r in rules)
    called: set[int] = set()
    launched = []
    runtime_dir = _triton_runtime_dir() if triton_rules else None

    def profiler(frame, event, arg):
        if event == "call":
            code = frame.f_code
            hit = codes.get(code)
            if hit is not None and (rules[hit].when is None or _safe_when(rules[hit].when, frame.f_locals)):
                called.add(hit)
            if runtime_dir and code.co_name == "run" and code.co_filename.startswith(runtime_dir):
                launched.append(True)

    tracker = _OpTracker(preds) if (preds or need_ops) else None
    use_profile = bool(codes) or bool(triton_rules)
    previous = sys.getprofile()

    def violations() -> tuple[list[int], int]:
        out = []
        for i, r in enumerate(rules):
            if r.kind == "no_calls" and i in called:
                out.append(i)
            elif r.kind == "no_ops" and tracker is not None and tracker.ops & r.ops:
                out.append(i)
            elif r.kind == "needs_ops" and tracker is not None and not tracker.ops & r.ops:
                out.append(i)
            elif r.kind == "no_alloc" and tracker is not None and i in tracker.alloc_hits:
                out.append(i)
            elif r.kind == "needs_triton" and not launched:
                out.append(i)
        return out, (tracker.count if tracker is not None else 0)

    with tracker if tracker is not None else contextlib.nullcontext():
        if use_profile:
            sys.setprofile(profiler)
        try:
            yield violations
        finally:
            if use_profile:
                sys.setprofile(previous)


# ----------------------------------------------------------------------------------------------
# One trial
# ----------------------------------------------------------------------------------------------


@dataclass
class Trial:
    """What happened when the learner's function ran on one trial's inputs."""

    status: str  # "ok" | "raised" | "not attempted" | "bad output"
    output: Any = None
    error: str = ""  # "TypeError: ..." when it raised
    frame: str = ""  # the learner's own traceback frame(s)
    violations: list[int] = field(default_factory=list)
    n_ops: int = 0  # aten ops run (when a rule needs the count)
    seconds: float = 0.0


def _is_learner_frame(filename: str) -> bool:
    path = os.path.abspath(filename) if not filename.startswith("<") else filename
    if path.startswith(_HARNESS_DIR):
        return False
    for mod in ("torch", "triton", "numpy", "umv2_ref", "kernels"):
        m = sys.modules.get(mod)
        if m is not None and getattr(m, "__file__", None) and path.startswith(os.path.dirname(m.__file__)):
            return False
    return not (path.startswith(os.path.dirname(os.__file__)) and "site-packages" not in path)


def learner_frames(err: BaseException, keep: int = 2) -> str:
    """The innermost frames of ``err``'s traceback that belong to the learner's code, formatted."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if _is_learner_frame(f.filename)]
    lines = []
    for f in frames[-keep:]:
        lines.append(f'  File "{f.filename}", line {f.lineno}, in {f.name}')
        if f.line:
            lines.append(f"    {f.line.strip()}")
    return "\n".join(lines)


def _describe_error(err: BaseException, limit: int = 600) -> str:
    try:
        text = f"{type(err).__name__}: {err}"
    except Exception:  # an exception whose str() raises
        text = type(err).__name__
    return text if len(text) <= limit else text[:limit] + f" ... ({len(text) - limit} more characters)"


def _clone(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def run_trial(fn: Callable, args: tuple, rules: tuple[Rule, ...]) -> Trial:
    start = time.perf_counter()
    try:
        with _watch(rules, args) as violations:
            out = fn(*_clone(args))
            broken, n_ops = violations()
    except NotImplementedError as err:
        return Trial("not attempted", error=f"NotImplementedError: {err}".rstrip(": "),
                     seconds=time.perf_counter() - start)
    except (_Timeout, KeyboardInterrupt):
        raise
    except BaseException as err:  # the learner's bug (SystemExit included): report it, never crash the notebook
        return Trial("raised", error=_describe_error(err), frame=learner_frames(err),
                     seconds=time.perf_counter() - start)
    try:  # copy the output now: the learner's code may mutate it later
        out = to_cpu(out)
    except Exception as err:
        return Trial("bad output", error=f"your function returned something that cannot be read back "
                                         f"({type(err).__name__}: {err})", seconds=time.perf_counter() - start)
    return Trial("ok", out, violations=broken, n_ops=n_ops, seconds=time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# All trials: in this process with a timer, or in a forked child
# ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    trials: list[Trial]
    status: str = "ran"  # "ran" | "timeout" | "crashed"
    detail: str = ""  # crash cause, or a note about how it ran
    stdout: str = ""  # what the child printed (forked runs)


def _run_all(fn: Callable, inputs: list[tuple], rules: tuple[Rule, ...], sink: Callable[[Trial], None]) -> None:
    for args in inputs:
        trial = run_trial(fn, args, rules)
        sink(trial)
        if trial.status != "ok":
            return


@contextlib.contextmanager
def _alarm(seconds: float):
    """Raise _Timeout in the main thread after ``seconds`` (and every 0.5 s after, in case it is swallowed)."""
    previous_handler = signal.getsignal(signal.SIGALRM)
    previous_left, previous_interval = signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()

    def on_alarm(signum, frame):
        raise _Timeout()

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.5)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_left > 0:
            left = max(1e-3, previous_left - (time.monotonic() - start))
            signal.setitimer(signal.ITIMER_REAL, left, previous_interval)


def run_inline(fn: Callable, inputs: list[tuple], rules: tuple[Rule, ...], timeout: float) -> Run:
    trials: list[Trial] = []
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM"):
        try:
            with _alarm(timeout):
                _run_all(fn, inputs, rules, trials.append)
        except _Timeout:
            return Run(trials, "timeout")
        return Run(trials)
    return _run_in_thread(fn, inputs, rules, timeout)


def _run_in_thread(fn: Callable, inputs: list[tuple], rules: tuple[Rule, ...], timeout: float) -> Run:
    trials: list[Trial] = []
    worker = threading.Thread(target=lambda: _swallow_timeout(fn, inputs, rules, trials), daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():  # ask it to stop at its next bytecode; it is a daemon either way
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(_Timeout))
        return Run(list(trials), "timeout")
    return Run(trials)


def _swallow_timeout(fn, inputs, rules, trials) -> None:
    with contextlib.suppress(_Timeout):
        _run_all(fn, inputs, rules, trials.append)


def fork_refusal() -> str | None:
    """Why a forked child cannot run the function here, or None when it can."""
    if not hasattr(os, "fork"):
        return "os.fork is not available on this platform"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return "CUDA is initialised in this process and a forked child cannot use it"
    return None


def _send(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj)
    os.write(fd, struct.pack("<Q", len(data)))
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _child(fn: Callable, inputs: list[tuple], rules: tuple[Rule, ...], fd: int) -> None:
    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool
    faulthandler.disable()  # a crash is reported by the parent, not dumped on the terminal
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    captured = io.StringIO()  # Python-level prints come back with the results
    sys.stdout = sys.stderr = captured

    def sink(trial: Trial) -> None:
        try:
            _send(fd, ("trial", trial))
        except Exception as err:  # an output that cannot be pickled
            _send(fd, ("trial", Trial("bad output", error=f"your function returned an object that cannot be "
                                                         f"sent back ({type(err).__name__}: {err})")))

    _run_all(fn, inputs, rules, sink)
    _send(fd, ("done", captured.getvalue()[-20000:]))


_SIGNAL_TEXT = {
    "SIGSEGV": "segmentation fault: an invalid memory access",
    "SIGBUS": "bus error: an invalid memory access",
    "SIGABRT": "abort",
    "SIGFPE": "floating-point exception",
    "SIGILL": "illegal instruction",
    "SIGKILL": "killed (out of memory?)",
}


def run_forked(fn: Callable, inputs: list[tuple], rules: tuple[Rule, ...], timeout: float) -> Run:
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(read_fd)
            _child(fn, inputs, rules, write_fd)
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(write_fd)
    buf, trials, done, stdout = b"", [], False, ""
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([read_fd], [], [], min(left, 0.5))
            if not ready:
                continue
            chunk = os.read(read_fd, 1 << 20)
            if not chunk:
                break
            buf += chunk
            while len(buf) >= 8:
                size = struct.unpack("<Q", buf[:8])[0]
                if len(buf) < 8 + size:
                    break
                kind, payload = pickle.loads(buf[8:8 + size])
                buf = buf[8 + size:]
                if kind == "trial":
                    trials.append(payload)
                else:
                    done, stdout = True, payload
    finally:
        os.close(read_fd)
        if not done:  # timed out, interrupted, or already dead (then this is a no-op on the zombie)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if timed_out:
        return Run(trials, "timeout", stdout=stdout)
    if done:
        return Run(trials, stdout=stdout)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return Run(trials, "crashed", f"the process running your function died with {name} "
                                      f"({_SIGNAL_TEXT.get(name, 'a fatal signal')})", stdout)
    return Run(trials, "crashed", f"the process running your function exited with code "
                                  f"{os.WEXITSTATUS(status)} before returning", stdout)
