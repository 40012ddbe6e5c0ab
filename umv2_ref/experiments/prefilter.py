"""The two-quadrant prefilter (``quadrants=2``): recall, cost and effect on training.

    python -m umv2_ref.experiments.prefilter                       # facts task, 3 seeds, 200 steps
    python -m umv2_ref.experiments.prefilter --steps 100 --seeds 0 1 2 --task facts

The rank-1 prefilter of TDQKR proposes the k x k grid of the top-k rows of ``a = S_row u`` and
top-k columns of ``b = S_col v``; it never proposes pairs whose two factors are both negative,
although ``lambda_1 a_i b_j`` is just as large there.  ``quadrants=2`` (this project's addition)
also proposes the top-k of ``-a`` x top-k of ``-b``.  This script measures, on the named
``ultramemv2`` tiny config (:mod:`umv2_ref.configs`):

1. **recall** of the exact top-m (full-grid search) by the prefilter with 1 and 2 quadrants, on the
   memory layers' real inputs, at initialisation and after training;
2. **cost**: milliseconds of one ``tucker_topk`` call (forward, the layers' shape, one token batch)
   and of one tiny-LM training step, with 1 and 2 quadrants, timed round-robin in one process
   (medians, process CPU time);
3. **effect on training**: final validation loss and accuracy of the tiny LM trained with 1 and 2
   quadrants, same seeds and settings, mean and min-max over seeds.

Prints Markdown tables; numbers depend on the machine and its load (printed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .. import synthetic
from ..configs import get_config
from ..layers import refresh_rank1
from ..metrics import rank1_recall
from ..model import TinyLM, lm_loss
from ..optim import param_groups
from ..retrieval import tucker_topk
from ..train import TrainConfig, load_model, train

QUADRANTS = (1, 2)


def layer_recalls(model: TinyLM, tokens: torch.Tensor) -> dict[int, list[float]]:
    """Recall of the exact top-m per memory layer, ``{quadrants: [recall of layer 0, 1, ...]}``."""
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, args, j=j: inputs.__setitem__(j, args[0]))
             for j, layer in enumerate(model.memory)]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    out: dict[int, list[float]] = {q: [] for q in QUADRANTS}
    for j, layer in enumerate(model.memory):
        ret = layer.retrieval
        with torch.no_grad():
            s_row, s_col = ret.axis_scores(inputs[j])  # [B, T, n, r]
        for q in QUADRANTS:
            out[q].append(rank1_recall(s_row, s_col, ret.cores, ret.cfg.topm, k=ret.cfg.prefilter_k,
                                       rank1=(ret.rank1_u, ret.rank1_v), quadrants=q))
    return out


def train_run(task: str, steps: int, seed: int, quadrants: int, out: Path | None) -> dict:
    cfg = TrainConfig(model="ultramemv2", task=task, steps=steps, seed=seed, eval_every=steps, progress=False,
                      out=None if out is None else str(out), model_overrides={"mem_prefilter_quadrants": quadrants})
    return train(cfg)


def build(task: object, quadrants: int) -> TinyLM:
    """The named ultramemv2 config at the task's vocabulary (global RNG: seed it first)."""
    return TinyLM(get_config("ultramemv2", vocab_size=task.vocab_size, mem_prefilter_quadrants=quadrants))


def trained_model(task_name: str, steps: int, seed: int, quadrants: int) -> tuple[TinyLM, dict]:
    """Train once with ``umv2_ref.train`` into a temporary directory and load the trained model back."""
    with tempfile.TemporaryDirectory() as tmp:
        results = train_run(task_name, steps, seed, quadrants, Path(tmp) / "run")
        model = load_model(Path(tmp) / "run")
    return model, results


def timing(task: object, batch_size: int, repeats: int = 20) -> dict[str, dict[int, float]]:
    """Median ms of one tucker_topk call and of one training step, per quadrant setting (round-robin)."""
    models, opts = {}, {}
    for q in QUADRANTS:
        torch.manual_seed(0)
        models[q] = build(task, q)
        opts[q] = torch.optim.AdamW(param_groups(models[q], lr=1e-3))
    x, y = task.sample(batch_size, torch.Generator().manual_seed(0))  # [B, T] inputs and targets
    ret = models[1].memory[0].retrieval
    with torch.no_grad():
        s_row, s_col = ret.axis_scores(models[1].embed(x))  # [B, T, n, r] one layer's shape
    rank1 = (ret.rank1_u, ret.rank1_v)
    ms: dict[str, dict[int, list[float]]] = {"tucker_topk": {q: [] for q in QUADRANTS},
                                             "training step": {q: [] for q in QUADRANTS}}
    for rep in range(repeats + 3):
        for q in QUADRANTS:
            start = time.process_time()
            with torch.no_grad():
                tucker_topk(s_row, s_col, ret.cores, ret.cfg.topm, rank1=rank1, quadrants=q)
            topk_ms = 1e3 * (time.process_time() - start)
            start = time.process_time()
            loss, _ = lm_loss(models[q](x), y)
            loss.backward()
            opts[q].step()
            opts[q].zero_grad(set_to_none=True)
            refresh_rank1(models[q])
            step_ms = 1e3 * (time.process_time() - start)
            if rep >= 3:  # warmup
                ms["tucker_topk"][q].append(topk_ms)
                ms["training step"][q].append(step_ms)
    return {name: {q: statistics.median(v) for q, v in per_q.items()} for name, per_q in ms.items()}


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="facts", choices=sorted(synthetic.TASKS))
    parser.add_argument("--batch", type=int, default=16, help="batch size of the timed training step")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats (median reported)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = lambda: ", ".join(f"{v:.1f}" for v in os.getloadavg())  # noqa: E731
    print(f"ultramemv2 tiny config, task {args.task}, {args.steps} steps, seeds {args.seeds}, "
          f"{torch.get_num_threads()} thread(s); load average {load()}\n")

    task = synthetic.make_task(args.task)
    tokens = synthetic.eval_set(task)[0][:64]  # [64, T] held-out inputs for the recall measurements
    times = timing(task, args.batch, args.repeats)
    print("| cost (median ms, process CPU time) | 1 quadrant | 2 quadrants | ratio |\n|---|---:|---:|---:|")
    for name, per_q in times.items():
        print(f"| {name} | {per_q[1]:.2f} | {per_q[2]:.2f} | {per_q[2] / per_q[1]:.2f}x |")

    rows = {}
    for q in QUADRANTS:
        for seed in args.seeds:
            model, results = trained_model(args.task, args.steps, seed, q)
            torch.manual_seed(seed)
            init = build(task, q).eval()  # the same seed's initialisation (train() seeds the same way)
            rows[q, seed] = {"final": results["final"], "init_recall": layer_recalls(init, tokens),
                             "trained_recall": layer_recalls(model, tokens)}
            print(f"trained quadrants={q} seed={seed}: val loss {results['final']['loss']:.4f}, "
                  f"acc {results['final']['acc']:.4f}", flush=True)

    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print("\n| recall of the exact top-m (mean over layers; mean (min-max) over seeds) | measured with 1 quadrant "
          "| measured with 2 quadrants |\n|---|---:|---:|")
    for q in QUADRANTS:
        for when in ("init_recall", "trained_recall"):
            label = "at init" if when == "init_recall" else f"after {args.steps} steps trained with quadrants={q}"
            if when == "init_recall" and q == 2:
                continue  # same initialisation as quadrants=1
            cells = [spread([mean(rows[q, s][when][m]) for s in args.seeds]) for m in QUADRANTS]
            print(f"| {label} | {cells[0]} | {cells[1]} |")

    print(f"\n| trained with | val loss, mean (min-max) over {len(args.seeds)} seeds | val acc, mean (min-max) |\n"
          "|---|---:|---:|")
    for q in QUADRANTS:
        losses = [rows[q, s]["final"]["loss"] for s in args.seeds]
        accs = [rows[q, s]["final"]["acc"] for s in args.seeds]
        print(f"| quadrants={q} | {spread(losses)} | {spread(accs)} |")
    print(f"\nload average after: {load()}")


if __name__ == "__main__":
    main()
