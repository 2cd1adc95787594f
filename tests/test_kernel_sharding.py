"""Pallas kernels inside the sharded train step run per device (8 simulated CPU devices).

One worker run (tests/workers/kernel_sharding.py) trains a Mamba + attention hybrid with
`scan_impl=pallas` and `attn_impl=pallas` for 2 steps on one device and under the
meshes (data, fsdp, tensor) = (2, 2, 2) and (1, 4, 2), and walks each train step's
jaxpr: every pallas_call must sit inside a shard_map and see per-device shards (batch /
(data x fsdp), heads and channels / tensor), and the losses must equal the one-device run.
"""
import json

import pytest

from test_sharding import assert_close, worker

BATCH, SEQ, HEADS, D_INNER = 8, 32, 8, 64
SPEC = {"config": "configs/transformer_lm.py:smoke",
        "overrides": {"train.batch_size": BATCH, "train.seq_len": SEQ,
                      "model.mixer_pattern": ["mamba", "attention"],
                      "model.mixers.attention.n_heads": HEADS,
                      "model.mixers.attention.n_kv_heads": 4,
                      "model.mixers.mamba.scan_impl": "pallas",
                      "model.mixers.attention.attn_impl": "pallas"},
        "steps": 2}


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [[2, 2, 2], pytest.param([1, 4, 2], marks=pytest.mark.exhaustive)])
def test_pallas_kernels_run_per_device_and_losses_match_one_device(mesh):
    rows = worker("kernel_sharding.py", json.dumps(dict(SPEC, meshes=[[], mesh])))
    assert [r.get("mesh") for r in rows[1:]] == [mesh], rows  # one row per mesh
    single = rows[0]
    flash = [k for k in single["kernels"] if len(k["operands"][0]) == 4]
    assert len(flash) == 3 and len(single["kernels"]) == 5, single["kernels"]  # + scan fwd/bwd
    for row in rows[1:]:
        data, fsdp, tensor = row["mesh"]
        b_local = BATCH // (data * fsdp)
        assert len(row["kernels"]) == len(single["kernels"]), row["mesh"]
        for kernel in row["kernels"]:
            where = (row["mesh"], kernel)
            assert kernel["shard_map"] is not None, where
            first = kernel["operands"][0]
            assert first[0] == b_local, where            # batch rows of this device only
            if len(first) == 4:                           # flash: q [B, Hq, Lp, Dp]
                assert first[1] == HEADS // tensor, where
            else:                                         # scan: u [B, Lp, Dp] (padded D)
                assert [b_local, SEQ, D_INNER // tensor] in kernel["shard_map"], where
        assert_close(row["losses"], single["losses"])
