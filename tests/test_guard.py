"""Non-finite steps never reach the params (the train step keeps the old state), and
train.nonfinite decides what the run does (jaxmix.train.guard)."""
import jax
import numpy as np
import pytest

from jaxmix.errors import NonFiniteError
from jaxmix.train.guard import NonFiniteGuard
from jaxmix.train.loop import Run
from jaxmix.train.step import NONFINITE


class FakeCheckpoints:
    def __init__(self, latest):
        self.latest = latest

    def latest_step(self):
        return self.latest


def test_a_nan_batch_leaves_the_state_and_training_goes_on(smoke_config, tmp_path):
    r = Run(smoke_config, str(tmp_path))
    state = r.init_fn()
    tokens = np.asarray(next(r.data.train_iter))
    good = {"tokens": tokens, "loss_mask": np.ones((tokens.shape[0], tokens.shape[1] - 1),
                                                   np.float32)}
    nan = {**good, "loss_mask": np.full_like(good["loss_mask"], np.nan)}  # a NaN batch
    step = r.train_step.compile(state, r.to_global(good))
    params = lambda s: jax.tree.map(np.asarray, s.params)
    with jax.set_mesh(r.mesh):
        state, m1 = step(state, r.to_global(good))
        before = params(state)
        state, m2 = step(state, r.to_global(nan))
        after = params(state)
        state, m3 = step(state, r.to_global(good))
    assert bool(m1["finite"]) and not bool(m2["finite"]) and bool(m3["finite"])
    assert np.isnan(float(m2["loss"])) and np.all(np.asarray(m2[NONFINITE]))
    assert not np.any(np.asarray(m1[NONFINITE]))
    jax.tree.map(np.testing.assert_array_equal, after, before)  # the update was dropped
    assert int(state.step) == 3
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), params(state), after)
    assert all(jax.tree.leaves(changed))  # and training went on
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params(state)))
    r.ckpt.close()


def guard(policy, latest=None, n_max=3):
    cfg = {"nonfinite": policy, "nonfinite_max": n_max}
    return NonFiniteGuard(cfg, ["embed/embedding", "layers_0/mixer/A_log", "norm_f/scale",
                                "lm_head", "x"], FakeCheckpoints(latest), "/runs/w")


def test_stop_policy_names_the_step_params_and_last_checkpoint():
    g = guard("stop", latest=40)
    g.check(41, True, [False] * 5, 2.0, 1.0)
    with pytest.raises(NonFiniteError) as e:
        g.check(42, False, [True, False, True, True, True], float("nan"), float("inf"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("step 42: loss nan, gradient norm inf")
    assert "embed/embedding, norm_f/scale, lm_head and 1 more params" in msg
    assert "last good checkpoint is step 40 in /runs/w/checkpoints" in msg
    with pytest.raises(NonFiniteError, match=r"\(a non-finite loss with finite gradients\); "
                       "no non-finite update.*no checkpoint was saved"):
        guard("stop").check(1, False, [False] * 5, float("nan"), 1.0)


def test_skip_policy_stops_after_n_in_a_row():
    g = guard("skip", n_max=3)
    for step in (1, 2):
        g.check(step, False, [True] + [False] * 4, float("nan"), float("nan"))
    g.check(3, True, [False] * 5, 1.0, 1.0)  # a good step resets the run of bad ones
    g.check(4, False, [True] + [False] * 4, float("nan"), float("nan"))
    g.check(5, False, [True] + [False] * 4, float("nan"), float("nan"))
    assert g.skipped == 4
    with pytest.raises(NonFiniteError, match="3 steps in a row, non-finite gradients in "
                       "embed/embedding"):
        g.check(6, False, [True] + [False] * 4, float("nan"), float("nan"))
