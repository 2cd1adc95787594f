"""Mamba LM train-step throughput and model-FLOP utilisation.

One run measures, on this machine and in this order:
  1. the fp32 matmul rate (a square jnp.dot, best of several calls),
  2. the jaxmix Mamba LM train step (models.build + optax adamw) with the chosen scan,
  3. a straightforward Mamba of the same shapes and params whose scan is a lax.scan
     over time with jax.checkpoint on every step (the baseline),
and prints one JSON line per measurement plus a summary line with the MFU and the
speed ratio. Model FLOPs per step = 6 * params * tokens + the scan's own work
(SCAN_FLOPS_PER_ELEM per (b, t, d, n) element per layer, forward + backward).

How the step uses the cores (the same for both steps):
  --processes 1 (default): this process only, with --devices CPU devices (0: one per
      core, as train.py runs on a CPU host, jaxmix/cpu.py) and the batch split over them.
  --processes 0: one worker process per core, each pinned to its core with its share of
      the batch; the gradients are averaged by one all-reduce of a flat vector over gloo
      (jax.distributed), then every worker applies the same adamw update. The matmul
      rate used for the MFU is then the larger of a probe over all cores in the
      launching process before the workers start, and the sum of the per-core rates the
      workers measure side by side between steps.
In both modes freed memory is kept mapped, while loops are compiled whole and AVX-512
hosts get 512-bit loops, as train.py sets up a CPU host (jaxmix/cpu.py).

  .venv/bin/python benchmarks/bench_mamba_step.py                # point 3
  .venv/bin/python benchmarks/bench_mamba_step.py --processes 0  # point 3, a worker per core
  .venv/bin/python benchmarks/bench_mamba_step.py --sweep        # point 4: L = 256..16384
"""
import argparse
import collections
import json
import os
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A worker of the multi-process mode gets its settings from launch() in this variable.
WORKER_ENV = "JAXMIX_BENCH_WORKER"
Worker = collections.namedtuple("Worker", "rank processes core port all_cores_flops")


def worker_spec():
    """This process's Worker settings, or None in a launching or single process."""
    raw = os.environ.get(WORKER_ENV)
    if not raw:
        return None
    rank, processes, core, port, flops = raw.split(",")
    return Worker(int(rank), int(processes), int(core), int(port), float(flops))


WORKER = worker_spec()
if WORKER:  # pinned before JAX starts, so its thread pool and cost model see one core
    os.sched_setaffinity(0, {WORKER.core})

from jaxmix import cpu  # noqa: E402

cpu.keep_freed_memory()  # before JAX starts its threads
cpu.compile_loops_whole()  # as train.py sets up a CPU host

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks.naive_mamba import naive_forward  # noqa: E402
from configs.mamba_lm import get_config  # noqa: E402
from jaxmix import models  # noqa: E402
from jaxmix.train.step import flat_mean  # noqa: E402

# Forward per (b, t, d, n): delta*A, exp, a*h, +b, (delta*u)*B, C*h, sum = 7 flops;
# backward counted as twice the forward (the usual 1 + 2 convention of 6*N*T).
SCAN_FLOPS_PER_ELEM = 3 * 7


QUIET = False  # workers other than 0 print nothing
OUT = sys.stdout  # JSON lines only: a worker sends the libraries' stdout chatter to stderr


def emit(**row):
    if not QUIET:
        print(json.dumps(row), file=OUT, flush=True)


def time_calls(fn, args, iters, warmup=2):
    """Seconds per call for `iters` calls (after `warmup`), as a list."""
    out = None
    for _ in range(warmup):
        out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


COMPILER_OPTIONS = None  # cpu.compiler_options(devices), for every jit
MESH = None  # the data-parallel mesh both steps run on


def matmul_rate(n=1024, iters=20):
    """fp32 FLOP/s of an n x n x n jnp.dot: the best of `iters` calls."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    f = jax.jit(jnp.dot, compiler_options=COMPILER_OPTIONS)
    times = time_calls(f, (a, b), iters)
    return 2 * n ** 3 / min(times), 2 * n ** 3 / statistics.median(times)


def model_config(args):
    cfg = get_config("default").model
    cfg.update(d_model=args.d_model, n_layers=args.n_layers, vocab_size=args.vocab)
    cfg.mixers.mamba.scan_impl = args.impl
    return cfg


def lm_loss(logits_BLV, tokens_BL, vocab):
    """Next-token cross-entropy; the last position (no target) has weight 0, so the
    logits are never sliced (a slice of [B, L, V] is a full copy on CPU)."""
    targets = jnp.roll(tokens_BL, -1, axis=1)
    if logits_BLV.shape[-1] > vocab:  # padded vocabulary rows never win
        logits_BLV = jnp.where(jnp.arange(logits_BLV.shape[-1]) < vocab, logits_BLV, -1e9)
    logp = jax.nn.log_softmax(logits_BLV)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    weight = (jnp.arange(tokens_BL.shape[1]) < tokens_BL.shape[1] - 1).astype(nll.dtype)
    return jnp.sum(nll * weight) / (weight.sum() * tokens_BL.shape[0])


def make_step(loss_fn, tx):
    """A jit'd adamw step. On a mesh of several devices it is data parallel: each device
    takes the gradient of its share of the batch, and the gradients are averaged by one
    all-reduce of a single flat vector, as train.py's step does under pure data
    parallelism (train.step.flat_mean; over gloo between processes)."""
    n = MESH.size

    def local_grads(params, tokens):
        loss_grads = jax.value_and_grad(loss_fn)(params, tokens)
        return flat_mean(loss_grads, "data") if n > 1 else loss_grads

    if n > 1:
        local_grads = jax.shard_map(local_grads, mesh=MESH, in_specs=(P(), P("data")),
                                    out_specs=(P(), P()), check_vma=False)

    def step(params, opt_state, tokens):
        loss, grads = local_grads(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return jax.jit(step, donate_argnums=(0, 1), compiler_options=COMPILER_OPTIONS)


def on_mesh(tokens, params):
    """Tokens split over the mesh's data axis, params replicated on it."""
    sharding = lambda spec: jax.sharding.NamedSharding(MESH, spec)
    return (jax.device_put(tokens, sharding(P("data"))),
            jax.device_put(params, sharding(P())))


def build(args):
    cfg = model_config(args)
    model = models.build(cfg)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq_len), 0, args.vocab)
    params = nn.meta.unbox(model.init(jax.random.key(0), tokens[:, :8]))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    tokens, params = on_mesh(tokens, params)
    tx = optax.adamw(1e-3, weight_decay=0.1)
    return cfg, model, tokens, params, n_params, tx


class StepRunner:
    """A compiled train step with its own params/optimizer state; `once()` times one step."""

    def __init__(self, name, loss_fn, params, tx, tokens):
        self.name, self.tokens = name, tokens
        step = make_step(loss_fn, tx)
        params = jax.tree.map(jnp.copy, params)
        self.state = [params, tx.init(params)]
        t0 = time.perf_counter()
        self.compiled = step.lower(params, self.state[1], tokens).compile()
        self.compile_s = time.perf_counter() - t0
        self.temp_bytes = self.compiled.memory_analysis().temp_size_in_bytes
        self.times = []
        for _ in range(2):  # warm-up
            self.once(record=False)

    def once(self, record=True):
        t0 = time.perf_counter()
        self.state[0], self.state[1], loss = self.compiled(self.state[0], self.state[1],
                                                           self.tokens)
        loss.block_until_ready()
        if record:
            self.times.append(time.perf_counter() - t0)

    def row(self, flops):
        sec = statistics.median(self.times)
        return dict(bench=self.name, seconds_per_step=sec, min_seconds=min(self.times),
                    tokens_per_sec=self.tokens.size / sec, model_gflop=flops / 1e9,
                    achieved_gflops=flops / sec / 1e9, compile_s=self.compile_s,
                    temp_bytes=self.temp_bytes, steps_timed=len(self.times))


def run_step(name, loss_fn, params, tx, tokens, iters, flops):
    runner = StepRunner(name, loss_fn, params, tx, tokens)
    for _ in range(iters):
        runner.once()
    row = runner.row(flops)
    emit(**row)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--n_layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--impl", default="xla")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no_baseline", action="store_true")
    ap.add_argument("--sweep", action="store_true",
                    help="point 4: time per token and memory for L = 256 .. 16384")
    ap.add_argument("--sweep_batch", type=int, default=1)
    ap.add_argument("--sweep_iters", type=int, default=3)
    ap.add_argument("--processes", type=int, default=1,
                    help="1: this process only; otherwise worker processes, one pinned per "
                         "core (0: one per core that the batch divides over). Not with --sweep")
    ap.add_argument("--devices", type=int, default=0,
                    help="with --processes 1: CPU devices to split the batch over "
                         "(0: one per core, as train.py)")
    args = ap.parse_args()
    global COMPILER_OPTIONS, MESH, QUIET
    batch = args.sweep_batch if args.sweep else args.batch
    if args.processes < 0 or args.devices < 0:
        ap.error("--processes and --devices must be >= 0")
    if WORKER:
        global OUT
        OUT = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)  # gloo prints its connection lines on stdout
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{WORKER.port}", WORKER.processes, WORKER.rank)
        QUIET = jax.process_index() != 0  # process 0 speaks for the run
        devices = jax.devices()
    else:
        n_proc = 1 if args.sweep else cpu.devices_for_batch(batch, args.processes)
        if n_proc > 1:
            return launch(n_proc)
        n_devices = cpu.devices_for_batch(batch, args.devices)
        cpu.use_cores_as_devices(n_devices)
        devices = jax.devices()[:n_devices]
    MESH = jax.sharding.Mesh(np.array(devices), ("data",))
    COMPILER_OPTIONS = cpu.compiler_options(devices)
    emit(bench="env", backend=jax.default_backend(), processes=jax.process_count(),
         devices=len(devices), cpus=cpu.cores() * jax.process_count(),
         compiler_options=COMPILER_OPTIONS, jax=jax.__version__, argv=sys.argv[1:])
    return sweep(args) if args.sweep else measure(args)


def launch(n_proc):
    """The multi-process mode's parent: probes the matmul rate on all cores, then runs
    this script as `n_proc` workers (one pinned per core, gloo between them) and waits;
    worker 0 prints the results. A worker that fails stops the others."""
    global COMPILER_OPTIONS
    COMPILER_OPTIONS = cpu.compiler_options(jax.devices()[:1])
    all_cores_flops, _ = matmul_rate(iters=20)
    emit(bench="launch", processes=n_proc, matmul_all_cores_gflops=all_cores_flops / 1e9)
    with socket.socket() as sock:  # a free port for the coordinator
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    core_ids = sorted(os.sched_getaffinity(0))
    workers = [subprocess.Popen(
        [sys.executable, os.path.abspath(__file__)] + sys.argv[1:],
        env=dict(os.environ, **{WORKER_ENV: ",".join(
            map(str, Worker(rank, n_proc, core_ids[rank], port, all_cores_flops)))}))
        for rank in range(n_proc)]
    while any(w.poll() is None for w in workers):
        failed = [w.returncode for w in workers if w.returncode not in (None, 0)]
        if failed:
            for w in workers:
                w.kill()
            sys.exit(f"error: a benchmark worker exited with status {failed[0]}")
        time.sleep(0.2)
    rc = max(w.returncode for w in workers)
    if rc:
        sys.exit(f"error: a benchmark worker exited with status {rc}")


def machine_matmul_rate(best_rates):
    """FLOP/s the MFU is measured against. One process: its best probe. Workers: the
    larger of the parent's all-core probe and the sum of the workers' per-core bests."""
    local = max(best_rates)
    if not WORKER:
        return local, dict(best_gflops=local / 1e9)
    from jax.experimental import multihost_utils
    per_core = np.asarray(multihost_utils.process_allgather(np.float32(local)), np.float64)
    peak = max(WORKER.all_cores_flops, per_core.sum())
    return peak, dict(
        best_gflops=peak / 1e9,
        all_cores_probe_gflops=WORKER.all_cores_flops / 1e9,
        per_core_gflops=[round(x / 1e9, 1) for x in per_core],
        per_core_sum_gflops=per_core.sum() / 1e9)


def measure(args):
    """Point 3: matmul rate, the jaxmix step and the naive step, interleaved."""
    cfg, model, tokens, params, n_params, tx = build(args)
    mamba = cfg.mixers.mamba
    d_inner = mamba.expand * cfg.d_model
    scan_elems = args.batch * args.seq_len * d_inner * mamba.d_state * cfg.n_layers
    flops = 6 * n_params * tokens.size + SCAN_FLOPS_PER_ELEM * scan_elems
    emit(bench="model", params=n_params, tokens_per_step=tokens.size,
         flops_6nt=6 * n_params * tokens.size, flops_scan=SCAN_FLOPS_PER_ELEM * scan_elems)

    def loss_fn(p, tok):
        return lm_loss(model.apply(p, tok)[0], tok, args.vocab)

    def naive_loss(p, tok):
        return lm_loss(naive_forward(p, tok, cfg), tok, args.vocab)

    runners = [StepRunner(f"jaxmix_{args.impl}", loss_fn, params, tx, tokens)]
    if not args.no_baseline:
        runners.append(StepRunner("naive_scan_remat", naive_loss, params, tx, tokens))
    # Interleave the matmul probe and the steps so machine noise hits all of them alike.
    best_rates, med_rates = [], []
    for _ in range(args.iters):
        best, med = matmul_rate(iters=5)
        best_rates.append(best)
        med_rates.append(med)
        for r in runners:
            r.once()
    peak, probe = machine_matmul_rate(best_rates)
    emit(bench="matmul_fp32", n=1024, **probe,
         median_of_medians_gflops=statistics.median(med_rates) / 1e9)
    rows = [r.row(flops) for r in runners]
    for row in rows:
        emit(**row)
    ours = rows[0]
    summary = dict(bench="summary", mfu=ours["achieved_gflops"] * 1e9 / peak,
                   mfu_best_step=flops / ours["min_seconds"] / peak,
                   mfu_6nt_only=6 * n_params * tokens.size / ours["seconds_per_step"] / peak,
                   matmul_gflops=peak / 1e9)
    if len(rows) > 1:
        summary["baseline_mfu"] = rows[1]["achieved_gflops"] * 1e9 / peak
        summary["speedup_vs_naive"] = ours["tokens_per_sec"] / rows[1]["tokens_per_sec"]
        summary["speedup_vs_naive_best_steps"] = rows[1]["min_seconds"] / ours["min_seconds"]
    emit(**summary)


def sweep(args):
    """Point 4: the same model and batch, L from 256 to 16384; time per token (median
    and best step) and compiled temp memory per token (flat = linear memory)."""
    rows = []
    for length in (256, 1024, 4096, 16384):
        args.seq_len, args.batch = length, args.sweep_batch
        cfg, model, tokens, params, n_params, tx = build(args)

        def loss_fn(p, tok):
            return lm_loss(model.apply(p, tok)[0], tok, args.vocab)

        row = run_step(f"sweep_L{length}", loss_fn, params, tx, tokens, args.sweep_iters,
                       6 * n_params * tokens.size)
        row.update(L=length, us_per_token=1e6 * row["seconds_per_step"] / tokens.size,
                   us_per_token_best=1e6 * row["min_seconds"] / tokens.size,
                   temp_bytes_per_token=row["temp_bytes"] / tokens.size)
        rows.append(row)
    ratio = lambda key: max(r[key] for r in rows) / min(r[key] for r in rows)
    emit(bench="sweep_summary", batch=args.sweep_batch,
         us_per_token={r["L"]: round(r["us_per_token"], 1) for r in rows},
         us_per_token_best={r["L"]: round(r["us_per_token_best"], 1) for r in rows},
         temp_bytes_per_token={r["L"]: round(r["temp_bytes_per_token"]) for r in rows},
         max_over_min_time_per_token=ratio("us_per_token"),
         max_over_min_best_time_per_token=ratio("us_per_token_best"),
         max_over_min_temp_bytes_per_token=ratio("temp_bytes_per_token"))


if __name__ == "__main__":
    main()
