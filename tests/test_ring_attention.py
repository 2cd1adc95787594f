"""Ring attention on 8 simulated CPU devices: exactness, collectives, memory.

Every multi-device check runs in one worker process (tests/workers/ring_cases.py)
that computes many cases and prints a JSON line per case. The ring runs inside a
user's `jax.shard_map` with the default check_vma=True (one case with check_vma=False).
Expected values are dense attention under tests/masks.py's `visible` mask, which
shares no code with jaxmix's masks.
"""
import itertools
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, devices_env, json_rows

ENV = devices_env(8)
FWD_TOL, GRAD_TOL = 1e-5, 1e-4

# One case per (ring size, causal, layout); GQA and segment ids chosen so that every
# pair of factor values (and every causal x layout x GQA / x segments triple) occurs.
_GQA_SEG = [(1, 0), (0, 0), (0, 0), (0, 1), (0, 1), (1, 1), (0, 0), (1, 0), (1, 0), (1, 0),
            (1, 1), (0, 1)]


def case(n, causal, layout, gqa, segments, **extra):
    return dict(n=n, causal=bool(causal), layout=layout, hq=4, hkv=1 if gqa else 4,
                segments=bool(segments), **extra)


def covering_cases():
    cells = itertools.product((2, 4, 8), (False, True), ("contiguous", "zigzag"))
    cases = [case(n, c, lay, g, s)
             for (n, c, lay), (g, s) in zip(cells, _GQA_SEG, strict=True)]
    cases[11]["q_chunks"] = 2   # several kernel calls per hop
    cases[4]["q_chunks"] = 4
    cases.append(dict(case(4, True, "zigzag", 1, 0), hkv=2, masked_rows=True, q_chunks=2))
    cases.append(case(4, True, "zigzag", 1, 1, window=20))        # sliding window: hops skip
    cases[-1]["check_vma"] = False   # the ring also runs in an unchecked shard_map
    cases.append(case(8, True, "contiguous", 0, 0, window=24, q_chunks=2))
    # sink keys 0..4 live on device 0 only: for devices 2..7 that hop is dead by the
    # window alone, so hop_is_live must keep it (sink not a multiple of any tile). Run
    # through sequence_parallel_attention, so its sink keyword is covered too.
    cases.append(case(8, True, "contiguous", 1, 0, window=24, sink=5, wrapper=True))
    return cases


def full_product():
    plain = [case(n, c, lay, g, s) for n, c, lay, g, s in itertools.product(
        (2, 4, 8), (False, True), ("contiguous", "zigzag"), (0, 1), (0, 1))]
    sinks = [case(n, True, lay, g, s, window=20, sink=sink, wrapper=sink == 16)
             for n, lay, g, s, sink in itertools.product(
                 (2, 4, 8), ("contiguous", "zigzag"), (0, 1), (0, 1), (5, 16))]
    return plain + sinks


def worker(arg, timeout=1800):
    return json_rows([os.path.join(ROOT, "tests", "workers", "ring_cases.py"), arg], ENV,
                     timeout)


def assert_rows_exact(rows, cases):
    assert len(rows) == len(cases)
    for row in rows:
        assert row["out_err"] <= FWD_TOL, row
        for g in ("dq_err", "dk_err", "dv_err"):
            assert row[g] <= GRAD_TOL, row
        if row.get("masked_rows"):
            assert row["masked_rows_max"] == 0.0, row


def test_zigzag_permutation_roundtrip():
    from jaxmix import parallel
    x = np.arange(2 * 16).reshape(2, 16)
    z = np.asarray(parallel.to_zigzag(x, 4))
    # 8 chunks of 2; device i holds chunks i and 7 - i
    assert z[0].tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    assert (np.asarray(parallel.from_zigzag(z, 4)) == x).all()
    with pytest.raises(ValueError, match="multiple of 2"):
        parallel.to_zigzag(np.zeros((1, 12)), 4)


def test_hop_is_live_keeps_sink_blocks():
    """A hop beyond the window is live only while its block holds sink keys that some
    query may see causally (contiguous shards of 16 tokens, window 24)."""
    from jaxmix.parallel.ring_attention import hop_is_live

    def live(q_lo, kv_lo, sink, window=24, causal=True):
        pos = lambda lo: jnp.arange(lo, lo + 16, dtype=jnp.int32)[None]
        return bool(hop_is_live(pos(q_lo), pos(kv_lo), None, None, causal, window, sink))

    assert not live(112, 0, 0)                          # outside the window
    assert live(112, 0, 5) and live(112, 0, 16)         # holds sink keys 0..4 / 0..15
    assert not live(112, 16, 16) and live(112, 16, 17)  # first sink key outside: 16
    assert live(112, 96, 0) and live(112, 96, 5)        # inside the window either way
    assert not live(0, 16, 32)                          # sink keys in the future
    assert not live(0, 16, 32, causal=False)            # (a window implies causal)
    assert live(48, 16, 0, window=None, causal=False)   # no window: sink is ignored
    seg = jnp.zeros((1, 16), jnp.int32)
    assert not bool(hop_is_live(jnp.arange(112, 128)[None], jnp.arange(16)[None], seg,
                                seg + 1, True, 24, 5))  # other segment: dead anyway


def test_ring_sink_argument_checks():
    from jaxmix import parallel
    q = jnp.zeros((1, 8, 2, 8))
    pos = jnp.arange(8)[None]
    with pytest.raises(ValueError, match="needs a sliding_window"):
        parallel.ring_attention(q, q, q, positions=pos, causal=True, sink=4)
    with pytest.raises(ValueError, match="sink must be >= 0"):
        parallel.ring_attention(q, q, q, positions=pos, causal=True, sliding_window=4,
                                sink=-1)


def test_ring_matches_full_attention():
    cases = covering_cases()
    assert_rows_exact(worker(json.dumps({"cases": cases})), cases)


@pytest.mark.exhaustive
def test_ring_matches_full_attention_every_combination():
    cases = full_product()
    assert_rows_exact(worker(json.dumps({"cases": cases})), cases)


def test_compiled_ring_moves_kv_by_collective_permute_only():
    report = worker("hlo")[0]
    for phase in ("forward", "backward"):
        ops = report[phase]
        assert ops["collective-permute"] > 0, report
        assert ops["all-gather"] == 0 and ops["all-to-all"] == 0, report
        assert ops["all-reduce"] == 0 and ops["reduce-scatter"] == 0, report


def test_sequence_parallel_attention_in_jit_on_a_mixed_mesh():
    rows = worker("wrapper")
    assert [r["layout"] for r in rows] == ["contiguous", "zigzag"]
    for row in rows:
        assert row["out_err"] <= FWD_TOL and row["collectives"]["all-gather"] == 0, row
        for g in ("dq_err", "dk_err", "dv_err"):
            assert row[g] <= GRAD_TOL, row


def test_ring_temp_memory_is_a_fifth_of_one_device_at_64k():
    rows = worker("memory")
    summary = rows[-1]
    assert summary["temp_ratio"] <= 0.2, rows


def test_bf16_ring_is_within_twice_a_plain_bf16_implementation():
    row = worker("bf16")[0]
    for name in ("out", "dq", "dk", "dv"):
        assert row[f"ring_{name}_err"] <= 2 * row[f"plain_{name}_err"], row
