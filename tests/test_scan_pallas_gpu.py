"""selective_scan_pallas_gpu: the Triton-backend Pallas kernels against the reference.

Off GPU the kernels run in the generic Pallas interpreter (`interpret=True`); the
Triton lowering itself is checked without a GPU through jax.export for "cuda".
The default set is a small cover of the B x L x D x N grid (every value of every
factor at least once); the full grid is marked exhaustive. Errors are normalised
like tests/test_selective_scan.py (max abs error over max |reference|).
"""
import functools
import itertools
import re

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from jaxmix.ops.scan_pallas_gpu import (DEFAULT, TUNING, default_interpret,
                                        selective_scan_pallas_gpu, settings, tiles)
from jaxmix.ops.selective_scan import selective_scan_reference
from kernels_pallas import selective_scan_gpu as kernel
from test_selective_scan import (ALL, BARE, SEGMENT_STARTS, assert_close, fwd_bwd_temp_vs_BLDN,
                                 make_inputs, outputs_and_grads, rel_err, segment_ids_of)

GRID = list(itertools.product((1, 2), (1, 17, 256, 1000), (16, 130), (4, 16)))
# (shape, inputs used, extra options); together every B, L, D and N of GRID, with and
# without z and the delta bias. Interpret mode compiles every unrolled chunk, so most
# cases pick short chunks. The first case runs a single ragged chunk (L = 1 below
# chunk = 4: no chunk loop). The second runs two chunks of 8 steps and a ragged one of
# 1 over nine channel blocks of 16 (D = 130 padded to 144) without the softplus and
# without prefetching the next chunk's rows; the third sixteen chunks of the default
# length; the fourth 166 chunks of 6 and a ragged one of 4 with N = 4 padded to 16;
# the last one reverse=True over two chunks of 8 and the ragged one of 3, walked
# first, with D and N padded.
FAST = [((1, 1, 16, 4), ALL, dict(chunk=4)),
        ((2, 17, 130, 16), BARE | {"D", "initial_state"},
         dict(softplus=False, chunk=8, block_d=16, prefetch=False)),
        ((1, 256, 16, 16), BARE | {"z"}, {}),
        ((2, 1000, 130, 4), ALL, dict(chunk=6)),
        ((1, 19, 20, 4), ALL, dict(reverse=True, chunk=8))]
TRITON_CALL = re.compile(r"custom_call @__gpu\$xla\.gpu\.triton\(")


def check(shape, use=ALL, softplus=True, reverse=False, **kw):
    x = make_inputs(*shape, seed=sum(shape))
    if not softplus:  # delta must stay positive without the softplus
        x["delta"] = jax.nn.softplus(x["delta"])
    want = outputs_and_grads(selective_scan_reference, x, use, softplus, reverse=reverse)
    got = outputs_and_grads(selective_scan_pallas_gpu, x, use, softplus, interpret=True,
                            reverse=reverse, **kw)
    assert_close(got, want)


@pytest.mark.parametrize("shape, use, kw", FAST)
def test_gpu_kernel_interpret_matches_reference(shape, use, kw):
    check(shape, use, **kw)


def test_gpu_kernel_segments_match_reference():
    """Packed documents, reverse=True over chunks of 8 (segment starts at chunk edges,
    one-step segments, one at the step the reverse scan meets first): the kernels'
    keep mask resets the state at the same steps as the reference. The forward
    direction runs in test_scan_pallas (the TPU kernel) and test_selective_scan."""
    x = make_inputs(2, 37, 20, 4, seed=7)
    seg = segment_ids_of(37, *SEGMENT_STARTS)
    want = outputs_and_grads(selective_scan_reference, x, ALL, reverse=True, segment_ids=seg)
    got = outputs_and_grads(selective_scan_pallas_gpu, x, ALL, interpret=True, chunk=8,
                            reverse=True, segment_ids=seg)
    assert_close(got, want)


def test_gpu_tiles_and_errors():
    assert DEFAULT["block_d"] == 32 and settings("cpu") == DEFAULT
    assert tiles(1000, 130, 4, device_kind="cpu") == (32, 160, 16, DEFAULT["chunk"])
    assert tiles(3, 16, 16, device_kind="cpu") == (16, 16, 16, 3)
    assert tiles(300, 512, 64, block_d=64, chunk=32) == (64, 512, 64, 32)
    assert default_interpret() == (jax.default_backend() != "gpu")
    x = make_inputs(1, 8, 16, 4)
    args = {k: x[k] for k in BARE}
    with pytest.raises(ValueError, match="block_d=24 must be a power of two"):
        selective_scan_pallas_gpu(**args, block_d=24)
    with pytest.raises(ValueError, match="chunk=0 must be positive"):
        selective_scan_pallas_gpu(**args, chunk=0)
    with pytest.raises(ValueError, match="B has shape"):
        selective_scan_pallas_gpu(**{**args, "B": args["B"][:, :5]})
    f32 = lambda *s: jnp.zeros(s, jnp.float32)
    with pytest.raises(ValueError, match="padded N=12 must be a power of two"):
        kernel.scan_fwd(f32(1, 8, 16), f32(1, 8, 16), None, f32(1, 8, 12), f32(1, 8, 12),
                        f32(16, 12), f32(16), f32(16), f32(1, 16, 12), softplus=False,
                        block_d=16, chunk=4, interpret=True)


def test_gpu_tuning_table_and_overrides():
    """settings() picks the table entry whose key occurs in the device kind (DEFAULT
    otherwise); explicit block_d / chunk / num_warps reach the kernels' launch."""
    assert settings("NVIDIA H200") == TUNING["H200"]
    assert settings("NVIDIA H100 80GB HBM3") == TUNING["H100"]
    assert settings("NVIDIA A100-SXM4-80GB") == TUNING["A100"]
    assert settings("NVIDIA GeForce RTX 4090") == DEFAULT
    for entry in (DEFAULT, *TUNING.values()):
        assert set(entry) == {"block_d", "chunk", "num_warps", "num_stages", "prefetch"}
        assert entry["block_d"] & (entry["block_d"] - 1) == 0 and entry["chunk"] >= 1
    x = make_inputs(1, 8, 64, 4)
    args = {k: x[k] for k in BARE}
    jaxpr = str(jax.make_jaxpr(lambda a: selective_scan_pallas_gpu(
        **a, interpret=False, block_d=16, chunk=4, num_warps=2))(args))
    # four channel blocks of 16, two chunk-start states of [64, 16], two warps
    assert "grid=(1, 4)" in jaxpr and "f32[1,2,64,16]" in jaxpr and "num_warps=2" in jaxpr


def test_gpu_cost_estimate():
    """cost_estimate counts the blocks moved: the backward moves and computes more than
    the forward, bf16 moves fewer bytes than fp32, and every pallas_call carries one."""
    fwd = kernel.cost_estimate(8, 2048, 1536, 16, backward=False, dtype_bytes=2)
    bwd = kernel.cost_estimate(8, 2048, 1536, 16, backward=True, dtype_bytes=2)
    fwd32 = kernel.cost_estimate(8, 2048, 1536, 16, backward=False, dtype_bytes=4)
    assert isinstance(fwd, pl.CostEstimate)
    assert bwd.bytes_accessed > fwd.bytes_accessed and bwd.flops > fwd.flops
    assert fwd32.bytes_accessed > fwd.bytes_accessed
    # at least u, delta, z, y once each; at most twice that plus the chunk-start states
    bld = 8 * 2048 * 1536 * 2
    assert 4 * bld < fwd.bytes_accessed < 8 * bld + 8 * 2048 * 1536 * 16 * 4 // 16
    x = make_inputs(1, 8, 16, 4)
    args = {k: x[k] for k in BARE}
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda a: jnp.sum(selective_scan_pallas_gpu(
        **a, interpret=False))))(args))
    assert jaxpr.count("cost_estimate=CostEstimate(flops=") == 2


def test_gpu_kernel_bf16_error_within_twice_reference():
    """bf16 inputs: the kernel's error against an fp32 evaluation of the same
    (bf16-rounded) inputs is at most 2x the reference's own bf16 error."""
    x = make_inputs(2, 70, 130, 16, seed=3, dtype=jnp.bfloat16)
    x32 = {k: v.astype(jnp.float32) for k, v in x.items()}
    (y_t, h_t), g_t = outputs_and_grads(selective_scan_reference, x32, ALL)
    (y_r, h_r), g_r = outputs_and_grads(selective_scan_reference, x, ALL)
    (y_p, h_p), g_p = outputs_and_grads(selective_scan_pallas_gpu, x, ALL, interpret=True,
                                        chunk=8)
    assert y_p.dtype == jnp.bfloat16
    assert rel_err(y_p, y_t) <= 2 * rel_err(y_r, y_t) + 1e-6
    assert rel_err(h_p, h_t) <= 2 * rel_err(h_r, h_t) + 1e-6
    for k in g_t:
        assert g_p[k].dtype == x[k].dtype, k
        assert rel_err(g_p[k], g_t[k]) <= 2 * rel_err(g_r[k], g_t[k]) + 1e-6, k


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_kernels_lower_for_triton(dtype):
    """The forward and backward kernels lower to Triton without a GPU: jax.export for
    platform "cuda" runs the Pallas -> Triton lowering (ragged L, padded D and N; in
    bf16 with segment ids, the keep mask's input too); only the custom call's platform
    check is disabled."""
    x = make_inputs(2, 300, 130, 4, dtype=dtype)
    seg = segment_ids_of(300, [100], [128, 200]) if dtype == jnp.bfloat16 else None
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]

    def forward(a):
        return selective_scan_pallas_gpu(**a, delta_softplus=True, return_last_state=True,
                                         interpret=False, segment_ids=seg)

    def loss(a):
        y, h = forward(a)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    def n_triton_calls(fn):
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"],
                                     disabled_checks=checks)(x)
        return len(TRITON_CALL.findall(exported.mlir_module()))

    assert n_triton_calls(forward) == 1
    assert n_triton_calls(jax.value_and_grad(loss)) == 2


def test_gpu_kernel_memory_never_holds_BLDN():
    """B=1, L=8192, D=512, N=16 (interpret mode, compiled, not run): forward+backward
    temp memory, the chunk-start states of chunks of 8 included, stays under one fp32
    [B, L, D, N] array."""
    temp, one_bldn = fwd_bwd_temp_vs_BLDN(functools.partial(selective_scan_pallas_gpu,
                                                            chunk=8))
    assert temp < one_bldn, (temp, one_bldn)


@pytest.mark.exhaustive
@pytest.mark.parametrize("use", [ALL, BARE], ids=["all_inputs", "bare"])
@pytest.mark.parametrize("bsz, length, d, n", GRID)
def test_gpu_kernel_full_grid(bsz, length, d, n, use):
    check((bsz, length, d, n), use)


def test_auto_picks_the_gpu_kernel_on_gpu(monkeypatch):
    """impl="auto" is this kernel on GPU (the Mosaic kernel on TPU, xla on CPU), and the
    xla path's chunk length follows the backend: cache-sized on CPU, ~sqrt(L) elsewhere."""
    from jaxmix.ops.scan_pallas import selective_scan_pallas
    from jaxmix.ops.scan_xla import chunk_size
    from jaxmix.ops.selective_scan import _pallas_fn, resolve_impl
    for backend, impl, fn in (("gpu", "pallas", selective_scan_pallas_gpu),
                              ("tpu", "pallas", selective_scan_pallas),
                              ("cpu", "xla", selective_scan_pallas)):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert resolve_impl("auto") == impl, backend
        assert _pallas_fn() is fn, backend
    assert chunk_size(16, 1536, 16, 65536, backend="gpu") == 256
    assert chunk_size(16, 1536, 16, 1024, backend="tpu") == 32
    assert chunk_size(1, 16, 4, 1000, backend="cpu") == 64
