"""The first command to run on a new TPU or GPU machine (toy sizes on a CPU, in CI):

  python benchmarks/device_check.py [--size toy|full]   # default: toy on CPU, full elsewhere

Checks every kernel on the backend JAX finds against its reference (forward and
gradients) and times it against a baseline measured in the same run: one JSON object per
line on stdout (progress on stderr), exit status 1 if any check fails. Rows carry "check",
"backend", "device_kind", and "ok" (correctness: errors within the bound; timing and train
rows: ran, finite results), an "error" line when a check raised, or "skipped" and why.
  attention        each jaxmix impl vs attention_reference, causal GQA: fp32 within 1e-5
                   (forward) / 1e-4 (gradients) of max|reference|; "auto" in bf16 (cuDNN on
                   GPU): error vs the fp32 reference of the same bf16 inputs at most 2x that
                   of the plain bf16 implementation (attention_reference(upcast=False)).
  attention_speed  causal bf16 fwd+bwd TFLOP/s, FlashAttention-2's count (forward
                   4*B*Hq*L*S*D halved for causal, backward 2.5x forward), of each impl and
                   of jax.nn.dot_product_attention (default implementation), with the ratio.
  scan             the Pallas selective-scan kernel(s) and the xla path vs
                   selective_scan_reference (z, D, delta_bias, softplus, initial and last
                   state), fp32, same bounds. On CPU both kernels (TPU, GPU) run interpreted.
  scan_speed       fwd+bwd GB/s, bf16 [B, L, *] operands, counting what forward + backward
                   must read and write: forward reads u, delta, z, B, C, writes y; backward
                   reads u, delta, z, dy, B, C, writes du, ddelta, dz, dB, dC:
                   (11*B*L*D + 6*B*L*N) * 2 bytes. Interpreted kernels are not timed.
  train_step       the mamba_lm train step as train.py builds it (jaxmix.train.loop.Run) on
                   one device: step time, tokens/s, model FLOPs (6 * params * tokens + scan
                   work, as bench_mamba_step; remat recomputation not counted) and MFU against
                   the chip's bf16 peak (roofline.PEAKS) or, if unknown, a measured matmul probe.
  summary          all ok, the failed checks, total seconds.
fp32 checks run under jax.default_matmul_precision("highest"): on TPU and GPU (TF32) fp32
matmuls otherwise run at reduced precision, the reference's included.
"""
import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Imported first: sets up a CPU host as train.py does (freed memory kept, whole loops)
# before JAX starts.
from benchmarks import bench_mamba_step  # noqa: E402
from benchmarks.bench_mamba_step import SCAN_FLOPS_PER_ELEM, emit, time_calls  # noqa: E402
from benchmarks.bench_train import load_config  # noqa: E402
from benchmarks.roofline import measured_peaks, spec_peaks  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxmix import ops  # noqa: E402
from jaxmix.ops.attention import attention_reference, choose_impl  # noqa: E402
from jaxmix.ops.per_device import tpu_kernel_interpret  # noqa: E402
from jaxmix.ops.scan_pallas import selective_scan_pallas  # noqa: E402
from jaxmix.ops.scan_pallas_gpu import selective_scan_pallas_gpu  # noqa: E402
from jaxmix.ops.selective_scan import selective_scan_reference  # noqa: E402
from jaxmix.train import state as state_lib  # noqa: E402
from jaxmix.train.loop import Run  # noqa: E402

# Shapes: attention (B, L, Hq, Hkv, D), scan (B, L, D, N), train (config, batch, seq_len).
# Full attention timing at B=2: the baseline's fp32 [B, Hq, L, L] scores (2 GiB) must fit
# a 16 GiB TPU v5e.
SIZES = {
    "toy": dict(attn_check=(1, 256, 2, 1, 32), attn_time=(1, 128, 2, 1, 64),
                scan_check=(2, 16, 16, 4), scan_time=(1, 32, 128, 16), iters=2,
                train=("configs/mamba_lm.py:smoke", 4, 32), steps=(1, 3)),
    "full": dict(attn_check=(2, 1000, 8, 2, 128), attn_time=(2, 4096, 16, 4, 128),
                 scan_check=(2, 1000, 300, 16), scan_time=(8, 2048, 1536, 16), iters=10,
                 train=("configs/mamba_lm.py:130m", 8, 2048), steps=(2, 5)),
}
FWD_TOL, GRAD_TOL = 1e-5, 1e-4
BACKEND = jax.default_backend()
KIND = jax.devices()[0].device_kind
ROWS = []


def log(msg):
    print(f"[device_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def finite(x):
    """x with NaN / inf floats (also inside dicts) as None: strict JSON."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    return None if isinstance(x, float) and not np.isfinite(x) else x


def report(check, **fields):
    row = finite(dict(check=check, backend=BACKEND, device_kind=KIND, **fields))
    ROWS.append(row)
    emit(**row)


def guarded(check, label, fn):
    """Runs fn() (-> the fields of one row, or None: it reported its own); an exception
    becomes an ok=false row."""
    log(f"{check} {label or ''}")
    try:
        fields = fn()
        if fields is not None:
            report(check, **fields)
    except Exception as e:  # noqa: BLE001 - any failure is a failed check, the rest still run
        lines = str(e).strip().splitlines() or [""]
        report(check, **label, ok=False, error=f"{type(e).__name__}: {lines[0][:300]}")


def normal(seed, shape, dtype=jnp.float32, scale=1.0, shift=0.0):
    """Inputs from numpy's generator (no per-shape compiles, which dominate toy runs)."""
    x = scale * np.random.default_rng(seed).standard_normal(shape, np.float32) + shift
    return jnp.asarray(x, dtype)


def rel_err(got, want):
    """max |got - want| / max |want| (the tests' error measure)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


@functools.lru_cache(maxsize=None)  # fn: a function object made once per impl
def outputs_and_grads(fn):
    """jit of args -> (fn(args), gradients w.r.t. the dict args of a fixed projection)."""
    def loss(args):
        outs = jax.tree.leaves(fn(args))
        return sum(jnp.sum(o.astype(jnp.float32) * jnp.cos(
            jnp.arange(o.size, dtype=jnp.float32) + i).reshape(o.shape))
            for i, o in enumerate(outs))
    return jax.jit(lambda a: (fn(a), jax.grad(loss)(a)))


def errors(got, want):
    """(forward error: max over outputs, {input: gradient error})."""
    fwd = max(rel_err(g, w) for g, w in zip(jax.tree.leaves(got[0]), jax.tree.leaves(want[0])))
    return fwd, {k: rel_err(got[1][k], want[1][k]) for k in want[1]}


def fp32_row(fn, args, want, **label):
    with jax.default_matmul_precision("highest"):
        fwd, grads = errors(outputs_and_grads(fn)(args), want)
    return dict(**label, ok=fwd < FWD_TOL and max(grads.values()) < GRAD_TOL, fwd_err=fwd,
                grad_err=max(grads.values()), grad_errs=grads, dtype="float32",
                bound=dict(fwd=FWD_TOL, grad=GRAD_TOL))


def median_seconds(fn, args, iters):
    times = time_calls(jax.jit(fn), args, iters, warmup=1)  # the warm-up call compiles
    return statistics.median(times), min(times)


# ----------------------------------------------------------------------------- attention
@functools.lru_cache(maxsize=None)  # one function object per impl: its jit is reused
def attend(impl):
    if impl in ("reference", "plain_bf16"):
        return lambda a: attention_reference(a["q"], a["k"], a["v"], causal=True,
                                             upcast=impl == "reference")[0]
    return lambda a: ops.attention(a["q"], a["k"], a["v"], causal=True, impl=impl)


def qkv_inputs(b, l, hq, hkv, d, dtype=jnp.float32):
    shapes = dict(q=(b, l, hq, d), k=(b, l, hkv, d), v=(b, l, hkv, d))
    return {n: normal(i, s, dtype) for i, (n, s) in enumerate(shapes.items())}


def attention_checks(size):
    b, l, hq, hkv, d = size["attn_check"]
    args = qkv_inputs(b, l, hq, hkv, d)
    label = lambda impl, **kw: dict(impl=impl, shape=dict(B=b, L=l, Hq=hq, Hkv=hkv, D=d),
                                    causal=True, **kw)
    with jax.default_matmul_precision("highest"):
        want = outputs_and_grads(attend("reference"))(args)
    impls = ["xla"] if BACKEND == "gpu" else ["pallas", "xla"]
    if BACKEND == "gpu":
        report("attention", impl="pallas", skipped="the flash Pallas kernels are TPU (Mosaic) "
               "kernels; on GPU jaxmix uses cuDNN (impl='auto') or the xla path")
    for impl in impls:
        mode = "compiled" if BACKEND == "tpu" or impl == "xla" else "interpreted"
        guarded("attention", label(impl), lambda: fp32_row(attend(impl), args, want,
                                                           **label(impl, mode=mode)))

    def bf16_auto():
        args16 = {n: x.astype(jnp.bfloat16) for n, x in args.items()}
        resolved = choose_impl("auto", args16["q"], args16["k"], causal=True)
        with jax.default_matmul_precision("highest"):
            truth = outputs_and_grads(attend("reference"))(
                {n: x.astype(jnp.float32) for n, x in args16.items()})
            plain_fwd, plain_grads = errors(outputs_and_grads(attend("plain_bf16"))(args16),
                                            truth)
            fwd, grads = errors(outputs_and_grads(attend("auto"))(args16), truth)
        ok = fwd <= 2 * plain_fwd and all(grads[n] <= 2 * plain_grads[n] for n in grads)
        return dict(**label("auto", resolved=resolved), ok=ok, dtype="bfloat16",
                    fwd_err=fwd, grad_errs=grads, plain_bf16_fwd_err=plain_fwd,
                    plain_bf16_grad_errs=plain_grads,
                    bound="err <= 2 x err of attention_reference(upcast=False) in bf16, "
                          "both vs the fp32 reference of the same bf16 inputs")
    guarded("attention", label("auto"), bf16_auto)


def attention_speed(size):
    b, l, hq, hkv, d = size["attn_time"]
    qkv = qkv_inputs(b, l, hq, hkv, d, jnp.bfloat16)
    fns = {"jax.nn.dot_product_attention": lambda a: jax.nn.dot_product_attention(
        a["q"], a["k"], a["v"], is_causal=True)}
    if BACKEND != "gpu":  # the flash kernels are TPU kernels (see the correctness rows)
        fns["pallas"] = attend("pallas") if BACKEND == "tpu" else None
    fns["xla"] = attend("xla")
    resolved = choose_impl("auto", qkv["q"], qkv["k"], causal=True)
    if resolved not in fns:  # cuDNN on GPU
        fns[f"auto ({resolved})"] = attend("auto")
    flops = 3.5 * 4 * b * hq * l * l * d / 2  # causal forward, + 2.5x for the backward
    speed_rows("attention_speed", fns, qkv, flops / 1e12, "tflops", size["iters"],
               shape=dict(B=b, L=l, Hq=hq, Hkv=hkv, D=d), causal=True, dtype="bfloat16",
               fwd_bwd_flops=flops)


def speed_rows(check, fns, x, work, unit, iters, extra=None, **fields):
    """One row per fns[name] (None: an interpreted kernel, not timed; a string: the
    reason it is not timed): seconds of the jit'd gradient of <fn(x), w> w.r.t. x
    (forward + backward), `unit` = work / seconds, the ratio to the first entry (the
    baseline) and, if given, the fields extra(name, seconds)."""
    baseline, base = next(iter(fns)), {}
    timed = [fn for fn in fns.values() if callable(fn)]
    w = normal(99, jax.eval_shape(timed[0], x).shape, jnp.bfloat16) if timed else None
    for name, fn in fns.items():
        if not callable(fn):
            report(check, impl=name, skipped=fn or "interpreted off its backend: its time "
                   "would say nothing about the kernel")
            continue

        def row(name=name, fn=fn):
            fwd_bwd = jax.grad(lambda x, w: jnp.vdot(fn(x), w).astype(jnp.float32))
            sec, best = median_seconds(fwd_bwd, (x, w), iters)
            if name == baseline:
                base["rate"] = work / sec
            row = dict(impl=name, ok=True, **fields, seconds=sec, min_seconds=best,
                       **{unit: work / sec}, baseline=baseline,
                       ratio_to_baseline=work / sec / base["rate"] if base else None)
            return {**row, **(extra(name, sec) if extra else {})}
        guarded(check, dict(impl=name), row)


# ---------------------------------------------------------------------- selective scan
def scan_inputs(bsz, length, d, n, dtype=jnp.float32):
    bld, bln = (bsz, length, d), (bsz, length, n)
    a_DN = -np.exp(0.5 * np.random.default_rng(22).standard_normal((d, n), np.float32))
    return dict(u=normal(20, bld, dtype), delta=normal(21, bld, dtype, 0.5, -1.0),
                A=jnp.asarray(a_DN), B=normal(23, bln, dtype), C=normal(24, bln, dtype),
                D=normal(25, (d,)), z=normal(26, bld, dtype),
                delta_bias=normal(27, (d,), scale=0.1), initial_state=normal(28, (bsz, d, n)))


def scan_impls(last_state=True):
    """{name: (scan function of dict inputs -> y (, last state), mode)}: the Pallas
    kernel(s) for this backend, then the xla path."""
    call = lambda fn, **kw: lambda a: fn(**a, delta_softplus=True,
                                         return_last_state=last_state, **kw)
    if BACKEND in ("tpu", "gpu"):  # ops.selective_scan(impl="pallas"): this backend's kernel
        kernel = "pallas_mosaic_tpu" if BACKEND == "tpu" else "pallas_triton_gpu"
        impls = {kernel: (call(ops.selective_scan, impl="pallas"), "compiled")}
    else:
        impls = {"pallas_mosaic_tpu": (call(selective_scan_pallas,
                                            interpret=tpu_kernel_interpret()), "interpreted"),
                 "pallas_triton_gpu": (call(selective_scan_pallas_gpu, interpret=True),
                                       "interpreted")}
    return {**impls, "xla": (call(ops.selective_scan, impl="xla"), "compiled")}


def scan_checks(size):
    shape = size["scan_check"]
    args = scan_inputs(*shape)
    with jax.default_matmul_precision("highest"):
        want = outputs_and_grads(lambda a: selective_scan_reference(
            **a, delta_softplus=True, return_last_state=True))(args)
    for name, (fn, mode) in scan_impls().items():
        label = dict(impl=name, shape=dict(zip("BLDN", shape)))
        guarded("scan", label, lambda: fp32_row(fn, args, want, **label, mode=mode))


def scan_speed(size):
    bsz, length, d, n = shape = size["scan_time"]
    impls = scan_impls(last_state=False)  # as the Mamba mixer trains: no states in or out
    kernel, (kernel_fn, mode) = next(iter(impls.items()))
    fns = {"xla": impls["xla"][0], kernel: None if mode == "interpreted" else kernel_fn}
    args = scan_inputs(*shape, dtype=jnp.bfloat16)
    del args["initial_state"]
    nbytes = (11 * bsz * length * d + 6 * bsz * length * n) * 2  # see the module docstring
    speed_rows("scan_speed", fns, args, nbytes / 1e9, "gbps", size["iters"],
               shape=dict(zip("BLDN", shape)), dtype="bfloat16", bytes=nbytes)


# -------------------------------------------------------------------------- train step
def peak_flops():
    """(FLOP/s, source): the spec-sheet bf16 peak of this chip (benchmarks/roofline.py's
    PEAKS), else a matmul probe."""
    peak = spec_peaks(KIND) if BACKEND != "cpu" else None
    if peak:
        return peak[0], f"spec sheet bf16 dense peak of {KIND}"
    return measured_peaks()[0], "measured matmul probe (roofline.measured_peaks)"


TRACE_STEPS = 2  # steps under jax.profiler.trace when train_step is given a trace_dir


def profile_steps(step_fn, state, batches, trace_dir):
    """Runs the steps under jax.profiler.trace(trace_dir) (with a Perfetto trace);
    returns None, or the error that stopped them as one line."""
    try:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for b in batches:
                state, metrics = step_fn(state, b)
            jax.block_until_ready(metrics)
    except Exception as e:  # noqa: BLE001 - the timed steps' row still goes out
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
    return None


def train_step(size, remat=None, trace_dir=None):
    """The train_step row; `remat` (if not None) overrides config.model.remat, and with
    a `trace_dir` TRACE_STEPS more steps run under jax.profiler.trace(trace_dir) after
    the timed ones (not counted in the times; a failed trace is the row's
    "trace_error")."""
    spec, batch, seq_len = size["train"]
    warmup, steps = size["steps"]
    config = load_config(spec)
    config.train.update(batch_size=batch, seq_len=seq_len)
    config.mesh.update(data=1, fsdp=1, tensor=1, sequence=1)
    if remat is not None:
        config.model.remat = remat
    traced = TRACE_STEPS if trace_dir else 0
    with tempfile.TemporaryDirectory() as workdir:
        r = Run(config, workdir, devices=jax.devices()[:1])
        try:
            state, it = r.init_fn(), r.data.train_iter
            batches = [r.to_global(next(it)) for _ in range(warmup + steps + traced)]
            t0 = time.perf_counter()
            step_fn = r.train_step.compile(state, batches[0])
            compile_s = time.perf_counter() - t0
            times, losses = [], []
            with jax.set_mesh(r.mesh):
                for i, b in enumerate(batches[:warmup + steps]):
                    t0 = time.perf_counter()
                    state, metrics = step_fn(state, b)
                    losses.append(float(metrics["loss"]))  # waits for the step
                    if i >= warmup:
                        times.append(time.perf_counter() - t0)
                if traced:
                    trace_error = profile_steps(step_fn, state, batches[warmup + steps:],
                                                trace_dir)
        finally:
            r.ckpt.close()
    m = config.model
    n_params = state_lib.param_count(r.abstract)
    tokens = batch * seq_len
    mamba = m.mixers.mamba
    flops_scan = (SCAN_FLOPS_PER_ELEM * tokens * mamba.expand * m.d_model * mamba.d_state
                  * m.n_layers)
    flops = 6 * n_params * tokens + flops_scan
    sec = statistics.median(times)
    peak, source = peak_flops()
    return dict(config=spec, ok=bool(np.all(np.isfinite(losses))), batch=batch,
                seq_len=seq_len, dtype=m.dtype, remat=m.remat, devices=1, params=n_params,
                compile_s=compile_s, steps_timed=len(times), step_seconds=sec,
                min_step_seconds=min(times), tokens_per_sec=tokens / sec,
                model_flops_per_step=flops, flops_6nt=6 * n_params * tokens,
                flops_scan=flops_scan, achieved_tflops=flops / sec / 1e12,
                peak_flops=peak, peak_source=source, mfu=flops / sec / peak,
                loss_first=losses[0], loss_last=losses[-1],
                **(dict(trace_error=trace_error) if traced else {}))


def json_stdout():
    """JSON lines (emit) on the real stdout only; anything else printing to stdout
    (libraries, compilers) goes to stderr from here on."""
    bench_mamba_step.OUT = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default=None,
                    help="toy (default on CPU) or full (default on TPU/GPU)")
    size_name = ap.parse_args().size or ("toy" if BACKEND == "cpu" else "full")
    size = SIZES[size_name]
    json_stdout()
    t0 = time.perf_counter()
    report("env", size=size_name, devices=jax.device_count(), jax=jax.__version__)
    for check, fn in (("attention", attention_checks), ("attention_speed", attention_speed),
                      ("scan", scan_checks), ("scan_speed", scan_speed),
                      ("train_step", train_step)):
        guarded(check, {}, lambda: fn(size))
    all_ok = all(r["ok"] for r in ROWS if "ok" in r)
    failed = [r["check"] + (f":{r['impl']}" if "impl" in r else "") for r in ROWS
              if r.get("ok") is False]
    report("summary", ok=all_ok, failed=failed, seconds=time.perf_counter() - t0)
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
