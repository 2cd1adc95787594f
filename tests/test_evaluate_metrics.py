"""jaxmix.evaluate's figures on hand-made examples: `accuracy` (scored targets predicted
right, over all examples) and `exact` (examples with every scored target right), through
the real Scorer (full pass and chunked recurrent pass) and evaluate_length."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxmix import evaluate

VOCAB, PADDED = 6, 8


class PredictsRepeat:
    """A stand-in model whose argmax prediction of the next token is the current token.
    Its padded vocabulary columns score highest of all, so only an argmax restricted to
    the real vocabulary predicts anything right."""
    cfg = ml_collections.ConfigDict(dict(vocab_size=VOCAB))

    def apply(self, variables, inputs, decode=False, cache=None):
        logits = jax.nn.one_hot(inputs, PADDED) + jnp.where(jnp.arange(PADDED) >= VOCAB, 3.0, 0.0)
        if not decode:
            return logits, {}
        seen = jnp.zeros(inputs.shape[:1], jnp.int32) if cache is None else cache["seen"]
        return logits, {}, {"seen": seen + inputs.shape[1]}


# (tokens [L + 1], loss mask [L]); the prediction for target t is token t - 1
EXAMPLES = [
    ([1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]),   # every target right
    ([2, 2, 3, 3, 3, 3, 3], [1, 1, 1, 1, 1, 1]),   # target 1 wrong: 5 of 6
    ([2, 2, 3, 3, 3, 3, 3], [1, 0, 1, 1, 1, 1]),   # the wrong target is not scored: exact
    ([4, 5, 0, 1, 2, 3, 4], [0, 0, 0, 1, 1, 0]),   # partial row, both scored targets wrong
    ([5, 5, 5, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]),   # target 2 wrong (5 -> 0): 4 of 5
]
HITS = [6, 5, 5, 0, 4]
COUNTS = [6, 6, 5, 2, 5]


def fake_make_batch(examples, batch):
    def make_batch(name, args, seq_len, seed, split, step, rows):
        picked = [examples[step * batch + r] for r in rows]
        assert all(len(t) == seq_len + 1 for t, _ in picked)
        return {"tokens": np.array([t for t, _ in picked], np.int32),
                "loss_mask": np.array([m for _, m in picked], np.float32)}
    return make_batch


def run(monkeypatch, examples, recurrent, batch=2):
    monkeypatch.setattr(evaluate, "is_recurrent", lambda cfg: recurrent)
    monkeypatch.setattr(evaluate.synthetic, "make_batch", fake_make_batch(examples, batch))
    scorer = evaluate.Scorer(PredictsRepeat(), {}, chunk=4)
    return scorer, evaluate.evaluate_length(
        scorer, "hand", None, len(examples[0][0]) - 1, examples=len(examples), batch=batch,
        seed=0, budget_bytes=2**30, time_budget_s=600)


@pytest.mark.parametrize("recurrent", [False, True], ids=["full", "chunked"])
def test_scorer_counts_hits_and_scored_targets_per_example(monkeypatch, recurrent):
    scorer, _ = run(monkeypatch, EXAMPLES, recurrent)
    tokens = np.array([t for t, _ in EXAMPLES], np.int32)
    mask = np.array([m for _, m in EXAMPLES], np.float32)
    hits, counts = scorer(tokens, mask)
    np.testing.assert_array_equal(hits, HITS)
    np.testing.assert_array_equal(counts, COUNTS)


@pytest.mark.parametrize("recurrent", [False, True], ids=["full", "chunked"])
def test_accuracy_and_exact_by_hand(monkeypatch, recurrent):
    """accuracy = 20 / 24 scored targets; exact = 2 of 5 examples (rows 0 and 2), over
    batches of 2, 2 and 1 examples."""
    _, row = run(monkeypatch, EXAMPLES, recurrent)
    assert row["status"] == "ok" and row["examples"] == 5
    assert row["accuracy"] == pytest.approx(sum(HITS) / sum(COUNTS))
    assert row["exact"] == pytest.approx(2 / 5)


def test_exact_extremes(monkeypatch):
    """All examples right: exact 1; one wrong target in each: exact 0 while accuracy
    stays high; an example with no scored target counts as exact (nothing is wrong)."""
    right = [EXAMPLES[0], EXAMPLES[2]]
    assert run(monkeypatch, right, False)[1]["exact"] == 1.0
    one_off = [EXAMPLES[1], EXAMPLES[4]]
    row = run(monkeypatch, one_off, False)[1]
    assert row["exact"] == 0.0 and row["accuracy"] == pytest.approx(9 / 11)
    unscored = [EXAMPLES[1], ([1, 2, 3, 4, 5, 0, 1], [0] * 6)]
    row = run(monkeypatch, unscored, False)[1]
    assert row["exact"] == 0.5 and row["accuracy"] == pytest.approx(5 / 6)
