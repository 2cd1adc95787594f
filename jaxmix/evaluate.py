"""Accuracy of trained models on a synthetic task across sequence lengths.

  python -m jaxmix.evaluate --workdir W [--workdir W2 ...] --task induction \\
      --lengths 64,128,...,65536 [--examples 64] [--memory-budget-gb 8]

For every workdir and length: fresh examples of the task (a seed stream of their
own, never seen in training), the model's argmax prediction at every scored target,
and two figures: `accuracy` (scored targets predicted right) and `exact` (examples
with all their targets right). Results are printed as JSON lines and written, with
a Markdown table and a plot of accuracy against length (log x-axis), to `--out`
(default: the first workdir) as eval_<task>.jsonl / .md / .png; when those exist, as
eval_<task>-2.* (-3, ...), so that no run replaces another's (`--overwrite` replaces
eval_<task>.*). Every argument is checked before a model is loaded.

Models whose layers are all recurrent (Mamba, Gated DeltaNet, MoM) run the sequence
in chunks of `--chunk` tokens through their decode path, carrying the state: memory does not
grow with the length, so lengths far past training (2^20) fit. Models with
attention run one forward pass over the whole sequence; before it runs, XLA's
memory analysis of the compiled pass is checked against `--memory-budget-gb`, the
batch is halved until it fits, and a length that does not fit at batch 1 is
reported as "skipped" (an allocation failure while running is reported as "OOM").
A length whose examples would take longer than `--time-budget-s` stops early and
reports how many examples it evaluated.
"""
import itertools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmix import cli, models
from jaxmix.data import synthetic
from jaxmix.errors import ConfigError
from jaxmix.train.step import scored_hits

GIB = 2**30


def parse_lengths(text):
    """"64,128,...,1024" -> [64, 128, 256, 512, 1024]; "..." continues the doubling
    (or the step) of the two numbers before it up to the number after it."""
    items = [s.strip() for s in (text or "").split(",") if s.strip()]
    out = []
    try:
        for i, item in enumerate(items):
            if item != "...":
                out.append(int(item))
                continue
            if len(out) < 2 or i + 1 >= len(items) or items[i + 1] == "...":
                raise ConfigError("--lengths: '...' needs two lengths before it and one "
                                  "after it, e.g. 64,128,...,65536")
            a, b, end = out[-2], out[-1], int(items[i + 1])
            grow = (lambda x: x * (b // a)) if a > 0 and b % a == 0 and b > a else (
                lambda x: x + (b - a))
            nxt = grow(b)
            while b < nxt < end:
                out.append(nxt)
                nxt = grow(nxt)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"--lengths: {text!r} is not a comma-separated list of "
                          f"integers, e.g. 64,128,...,65536") from None
    if not out:
        raise ConfigError("--lengths: empty; give one or more lengths, e.g. 256,512,1024")
    if min(out) < 1:
        raise ConfigError(f"--lengths: {min(out)} is not positive")
    return sorted(set(out))


def is_recurrent(cfg):
    """Every layer's mixer decodes with a fixed-size cache (Mamba, Gated DeltaNet, MoM)."""
    return all(cls.FIXED_SIZE_CACHE for _, cls, _ in models.layer_mixers(cfg))


class Scorer:
    """Jit'd scoring of one model: chunked recurrent or one full forward pass. Each
    (path, batch, length) is compiled once; the memory check reads the same
    executable that then runs."""

    def __init__(self, model, params, chunk):
        self.model, self.params, self.chunk = model, params, chunk
        self.recurrent = is_recurrent(model.cfg)
        self._executables = {}
        vocab = model.cfg.vocab_size

        def chunk_fn(params, cache, inputs, targets, mask):
            logits, _, cache = model.apply({"params": params}, inputs, decode=True,
                                           cache=cache)
            return cache, scored_hits(logits, targets, mask, vocab, axis=1)

        def full_fn(params, inputs, targets, mask):
            logits, _ = model.apply({"params": params}, inputs)
            return scored_hits(logits, targets, mask, vocab, axis=1)

        self.chunk_fn = jax.jit(chunk_fn)
        self.full_fn = jax.jit(full_fn)

    def _avals(self, batch, length):
        i32 = jax.ShapeDtypeStruct((batch, length), jnp.int32)
        return i32, i32, jax.ShapeDtypeStruct((batch, length), jnp.float32)

    def _zero_cache(self, batch):
        """The decode cache before the first token: zeros, as the mixers start."""
        shapes = jax.eval_shape(self.chunk_fn, self.params, None, *self._avals(batch, 1))[0]
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

    def _executable(self, batch, length):
        """The compiled pass over [batch, length] tokens (a chunk on the recurrent path)."""
        key = (self.recurrent, batch, length)
        if key not in self._executables:
            if self.recurrent:
                lowered = self.chunk_fn.lower(self.params, self._zero_cache(batch),
                                              *self._avals(batch, length))
            else:
                lowered = self.full_fn.lower(self.params, *self._avals(batch, length))
            self._executables[key] = lowered.compile()
        return self._executables[key]

    def memory_bytes(self, batch, length):
        """XLA's estimate of the compiled pass's memory (arguments, outputs, temps)."""
        step = min(length, self.chunk) if self.recurrent else length
        m = self._executable(batch, step).memory_analysis()
        if m is None:
            return 0
        return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes)

    def __call__(self, tokens_BL1, mask_BL):
        """(hits [B], counts [B]) of one batch."""
        inputs, targets = tokens_BL1[:, :-1], tokens_BL1[:, 1:]
        batch, length = inputs.shape
        if not self.recurrent:
            hits, counts = self._executable(batch, length)(self.params, inputs, targets,
                                                           mask_BL)
            return np.asarray(hits), np.asarray(counts)
        cache, hits, counts = self._zero_cache(batch), 0, 0
        for start in range(0, length, self.chunk):
            part = slice(start, start + self.chunk)
            run = self._executable(batch, inputs[:, part].shape[1])
            cache, (h, c) = run(self.params, cache, inputs[:, part], targets[:, part],
                                mask_BL[:, part])
            hits, counts = hits + np.asarray(h), counts + np.asarray(c)
        return hits, counts


def _is_oom(error):
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def evaluate_length(scorer, name, args, length, *, examples, batch, seed, budget_bytes,
                    time_budget_s):
    """One result row (dict) for one model at one length."""
    row = {"length": length}
    while True:
        need = scorer.memory_bytes(batch, length)
        if need <= budget_bytes or batch == 1:
            break
        batch = max(1, batch // 2)
    row["memory_gib"] = round(need / GIB, 3)
    if need > budget_bytes:
        return {**row, "status": "skipped", "reason":
                f"needs {need / GIB:.1f} GiB at batch 1, over the "
                f"{budget_bytes / GIB:.1f} GiB memory budget"}
    hits = counts = exact = done = 0
    t0 = time.perf_counter()
    step = 0
    try:
        while done < examples:
            b = min(batch, examples - done)
            made = synthetic.make_batch(name, args, length, seed, "eval", step,
                                        range(b))
            h, c = scorer(made["tokens"], made["loss_mask"])
            hits, counts = hits + int(h.sum()), counts + int(c.sum())
            exact += int(np.sum(h == c))
            done, step = done + b, step + 1
            if time.perf_counter() - t0 > time_budget_s and done < examples:
                row["reason"] = (f"stopped after {done} of {examples} examples: over the "
                                 f"{time_budget_s:.0f} s time budget")
                break
    except Exception as e:  # noqa: BLE001 - an allocation failure is a result here
        if not _is_oom(e):
            raise
        return {**row, "status": "OOM", "reason": str(e).splitlines()[0][:200]}
    return {**row, "status": "ok", "accuracy": hits / max(counts, 1),
            "exact": exact / max(done, 1), "examples": done, "batch": batch,
            "seconds": round(time.perf_counter() - t0, 2)}


# ----------------------------------------------------------------------------- outputs

def label_of(workdirs):
    names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    return names if len(set(names)) == len(names) else [os.path.normpath(w) for w in workdirs]


def cell(row):
    if row["status"] != "ok":
        return row["status"]
    text = f"{100 * row['accuracy']:.1f}%"
    return text + (f" (n={row['examples']})" if "reason" in row else "")


def markdown(task, labels, results, lengths):
    head = f"| length | {' | '.join(labels)} |"
    lines = [f"Accuracy on `{task}` (scored targets predicted right).", "", head,
             "|" + "---|" * (len(labels) + 1)]
    for length in lengths:
        cells = [cell(next(r for r in rows if r["length"] == length)) for rows in results]
        lines.append(f"| {length} | {' | '.join(cells)} |")
    notes = [f"- {label}, {r['length']}: {r['reason']}" for label, rows in zip(labels, results)
             for r in rows if "reason" in r]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def plot(path, task, labels, results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rows in zip(labels, results):
        ok = [(r["length"], 100 * r["accuracy"]) for r in rows if r["status"] == "ok"]
        if ok:
            ax.plot(*zip(*ok), "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{task}: accuracy against length")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


OUTPUT_SUFFIXES = (".jsonl", ".md", ".png")


def output_base(out, task, overwrite):
    """The path (without suffix) of this run's result files in folder `out`:
    eval_<task>, or with earlier results there (and no `overwrite`) the first free
    eval_<task>-N (N = 2, 3, ...), so that no run replaces another's files."""
    base = os.path.join(out, f"eval_{task}")
    if overwrite:
        return base
    for candidate in itertools.chain([base], (f"{base}-{n}" for n in itertools.count(2))):
        if not any(os.path.exists(candidate + ext) for ext in OUTPUT_SUFFIXES):
            return candidate


# ----------------------------------------------------------------------------- CLI

def build_parser():
    p = cli.Parser("python -m jaxmix.evaluate", __doc__.split("\n")[0])
    p.add_argument("--workdir", type=cli.path, action="append", required=True,
                   help="a train.py workdir; repeat to compare models side by side")
    p.add_argument("--task", choices=sorted(synthetic.TASKS), default=None,
                   help="synthetic task (default: the first workdir's data.source)")
    p.add_argument("--lengths", required=True, help="sequence lengths, e.g. 64,128,...,65536")
    p.add_argument("--examples", type=cli.positive_int, default=64, help="examples per length")
    p.add_argument("--batch", type=cli.positive_int, default=16,
                   help="examples per forward pass (halved until the pass fits the budget)")
    p.add_argument("--chunk", type=cli.positive_int, default=4096,
                   help="tokens per step of the recurrent path (Mamba, Gated DeltaNet, MoM)")
    p.add_argument("--seed", type=cli.integer, default=0, help="seed of the examples")
    p.add_argument("--memory-budget-gb", type=cli.positive_float, default=8.0,
                   help="memory one forward pass may take (XLA's estimate)")
    p.add_argument("--time-budget-s", type=cli.positive_float, default=600.0,
                   help="seconds per model and length before it stops early")
    p.add_argument("--out", type=cli.path, default=None,
                   help="folder for the table and plot (default: the first workdir)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace eval_<task>.* in the output folder instead of writing "
                   "eval_<task>-N.*")
    cli.add_duo_args(p)  # scores the per-head masked forward the two caches compute
    return p


def with_duo(a, label, model, params, config):
    """(label, model, params) with --duo applied: the per-head masked forward, i.e.
    what decoding every token with the two caches computes."""
    cfg, params, retrieval = cli.duo_deploy(a, config.model, params,
                                            config.train.get("seq_len"))
    if retrieval is None:
        return label, model, params
    return (f"{label} duo {100 * retrieval.mean():.0f}% retrieval", models.build(cfg),
            params)


def check_args(a):
    """Every argument, before a model is loaded: (task, lengths, output base path)."""
    from jaxmix.paths import check_output_folder
    from jaxmix.workdir import open_workdir
    lengths = parse_lengths(a.lengths)
    configs = [open_workdir(w) for w in a.workdir]
    task = a.task or configs[0].data.source.partition("synthetic:")[2]
    if task not in synthetic.TASKS:
        raise ConfigError(f"--task: {configs[0].data.source!r}, the first workdir's data, is "
                          f"not a synthetic task; give --task, one of "
                          f"{', '.join(synthetic.TASKS)}")
    for workdir, config in zip(a.workdir, configs):
        args = synthetic.task_args(synthetic.task_config(config, task))
        for length in lengths:
            try:
                synthetic.check(task, args, length, what="--lengths")
            except ConfigError as e:
                raise ConfigError(f"--workdir {workdir}: {e}") from None
    cli.check_duo_args(a)
    out = a.out or a.workdir[0]
    check_output_folder(out, "--out", "give another --out")
    return task, lengths, output_base(out, task, a.overwrite)


def run(a):
    from jaxmix.workdir import load_workdir
    task, lengths, base = check_args(a)
    labels, results = [], []
    for label, workdir in zip(label_of(a.workdir), a.workdir):
        model, params, config = load_workdir(workdir)
        label, model, params = with_duo(a, label, model, params, config)
        labels.append(label)
        args = synthetic.task_args(synthetic.task_config(config, task), "val")
        scorer = Scorer(model, params, a.chunk)
        rows = []
        for length in lengths:
            row = {"workdir": label, "task": task, **evaluate_length(
                scorer, task, args, length, examples=a.examples, batch=a.batch,
                seed=a.seed, budget_bytes=a.memory_budget_gb * GIB,
                time_budget_s=a.time_budget_s)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        results.append(rows)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(base + ".jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for rows in results for r in rows)
    table = markdown(task, labels, results, lengths)
    with open(base + ".md", "w") as f:
        f.write(table)
    plot(base + ".png", task, labels, results)
    print(table, file=sys.stderr)
    print(f"wrote {base}.jsonl, .md and .png", file=sys.stderr)


def main(argv=None):
    return cli.main(build_parser(), argv, run, "interrupted; no results were written")


if __name__ == "__main__":
    sys.exit(main())
