"""selective_scan(impl="pallas"): the Pallas kernels against the reference.

Off TPU the kernels run in TPU interpret mode (`pltpu.InterpretParams`), which
simulates VMEM, DMAs and the grid; it is slow, so the default set is a few small
shapes and the full grid (B x L x D x N) is marked exhaustive. Errors are
normalised like tests/test_selective_scan.py (max abs error over max |reference|).
"""
import itertools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxmix import ops
from jaxmix.ops.scan_pallas import selective_scan_pallas, tiles
from jaxmix.ops.selective_scan import selective_scan_reference
from test_selective_scan import (ALL, BARE, SEGMENT_STARTS, assert_close, fwd_bwd_temp_vs_BLDN,
                                 make_inputs, outputs_and_grads, rel_err, segment_ids_of)

# (shape, inputs used, extra options); the last one reverse=True over two time tiles
# of 128, the 126 padded steps (which the reverse scan meets first) in the second, in
# the generic Pallas interpreter (the TPU one takes twice as long for its 256 steps).
FAST = [((2, 37, 16, 4), ALL, {}), ((1, 1, 130, 16), ALL, {}),
        ((1, 300, 256, 4), BARE | {"z"}, {}),
        pytest.param((2, 150, 16, 16), BARE | {"initial_state", "delta_bias"}, {},
                     marks=pytest.mark.exhaustive),  # the first case uses both by default
        ((1, 130, 16, 4), ALL, dict(reverse=True, interpret=True))]
GRID = list(itertools.product((1, 2), (1, 37, 300, 2048), (16, 130, 256), (4, 16)))


def check(shape, use=ALL, reverse=False, **kw):
    x = make_inputs(*shape, seed=sum(shape))
    want = outputs_and_grads(selective_scan_reference, x, use, reverse=reverse)
    got = outputs_and_grads(selective_scan_pallas, x, use, reverse=reverse, **kw)
    assert_close(got, want)


@pytest.mark.parametrize("shape, use, kw", FAST)
def test_pallas_interpret_matches_reference(shape, use, kw):
    check(shape, use, **kw)


def test_pallas_segments_match_reference():
    """Packed documents: the kernels' keep mask resets the state at the same steps as
    the reference (one-step segments, one at the last step, ragged padding after it;
    the generic Pallas interpreter, twice as fast as the TPU one). Forward only: the op
    aligns the mask with the scan's direction (checked both ways in
    test_selective_scan) and the kernels read it at the row they advance, whichever
    way they walk; the GPU kernel's test runs the reverse scan."""
    x = make_inputs(2, 37, 16, 4, seed=7)
    seg = segment_ids_of(37, *SEGMENT_STARTS)
    want = outputs_and_grads(selective_scan_reference, x, ALL, segment_ids=seg)
    got = outputs_and_grads(selective_scan_pallas, x, ALL, segment_ids=seg, interpret=True)
    assert_close(got, want)


def test_pallas_race_free_on_two_cores():
    """Batch and channel tiles spread over two simulated TensorCores ("parallel" axes),
    under the interpreter's race detector; checked after the forward kernel alone and
    after the backward kernel (the detector's state is per kernel)."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret

    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    x = make_inputs(2, 40, 140, 4, seed=5)
    args = {k: x[k] for k in ALL}
    jax.block_until_ready(selective_scan_pallas(**args, delta_softplus=True,
                                                interpret=params, block_d=128))
    assert not tpu_interpret.races.races_found
    want = outputs_and_grads(selective_scan_reference, x, ALL)
    got = outputs_and_grads(selective_scan_pallas, x, ALL, block_d=128, interpret=params)
    assert not tpu_interpret.races.races_found
    assert_close(got, want)


@pytest.mark.exhaustive  # FAST: three time tiles; the race test: two channel tiles
def test_pallas_several_time_tiles():
    """Three time tiles (the state carried in VMEM scratch across the arbitrary axis,
    the backward walking them in reverse), two channel tiles, a ragged last tile."""
    check((1, 300, 140, 4), ALL, block_d=128)


def test_pallas_dispatch_and_tiles():
    x = make_inputs(1, 20, 16, 4)
    args = {k: x[k] for k in BARE}
    y = ops.selective_scan(**args, impl="pallas")
    assert rel_err(y, selective_scan_reference(**args)) < 1e-5
    assert tiles(37, 130, 16) == (48, 48, 256, 256)
    assert tiles(300, 16, 4) == (128, 384, 128, 128)
    assert tiles(2048, 1024, 16)[2:] == (1024, 1024)
    assert tiles(2048, 3072, 16)[2:] == (1024, 3072)  # 1536 lanes: backward over budget
    assert tiles(2048, 1024, 64)[2:] == (256, 1024)  # VMEM bound on the state buffer


def test_pallas_bf16_error_within_twice_reference():
    x = make_inputs(2, 70, 130, 16, seed=3, dtype=jnp.bfloat16)
    x32 = {k: v.astype(jnp.float32) for k, v in x.items()}
    (y_t, h_t), g_t = outputs_and_grads(selective_scan_reference, x32, ALL)
    (y_r, h_r), g_r = outputs_and_grads(selective_scan_reference, x, ALL)
    (y_p, h_p), g_p = outputs_and_grads(selective_scan_pallas, x, ALL)
    assert y_p.dtype == jnp.bfloat16
    assert rel_err(y_p, y_t) <= 2 * rel_err(y_r, y_t) + 1e-6
    assert rel_err(h_p, h_t) <= 2 * rel_err(h_r, h_t) + 1e-6
    for k in g_t:
        assert rel_err(g_p[k], g_t[k]) <= 2 * rel_err(g_r[k], g_t[k]) + 1e-6, k


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_lowers_for_tpu(dtype):
    """The forward and backward kernels lower to Mosaic (TPU) without a TPU:
    jax.export runs the Pallas -> Mosaic lowering for platform "tpu" (in bf16 with
    segment ids: the keep mask's input too)."""
    x = make_inputs(2, 300, 130, 16, dtype=dtype)
    seg = segment_ids_of(300, [100], [128, 200]) if dtype == jnp.bfloat16 else None

    def loss(a):
        y, h = selective_scan_pallas(**a, delta_softplus=True, return_last_state=True,
                                     interpret=False, segment_ids=seg)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    exported = jax.export.export(jax.jit(jax.value_and_grad(loss)), platforms=["tpu"])(x)
    assert exported.mlir_module().count("tpu_custom_call") == 2


def test_pallas_memory_never_holds_BLDN():
    """B=1, L=8192, D=512, N=16 (interpret mode, compiled, not run): forward+backward
    temp memory stays under one fp32 [B, L, D, N] array."""
    temp, one_bldn = fwd_bwd_temp_vs_BLDN(selective_scan_pallas)
    assert temp < one_bldn, (temp, one_bldn)


@pytest.mark.exhaustive
@pytest.mark.parametrize("bsz, length, d, n", GRID)
def test_pallas_full_grid(bsz, length, d, n):
    check((bsz, length, d, n), ALL)
