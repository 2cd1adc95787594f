"""Document packing: the mamba_lm default preset trained with `data.packing = "concat"`
and with `"segments"`, each evaluated on the held-out stdlib files both ways.

  python benchmarks/bench_packing.py [--config configs/mamba_lm.py] [--out runs/packing]

Trains (or resumes, or reuses) one workdir per packing with train.py, then evaluates
both models on EVERY validation window of both kinds:
  concat        windows cut from the held-out files run together (a file's first bytes
                are predicted from the previous file's end);
  per document  each held-out file from its own start, with segment ids and positions
                (`packing.val_windows`: files packed whole, padding masked).
One JSON line per (model, evaluation): bits per byte and the scored targets. The
baseline in the same run is the concat model, evaluated the concat way (what train.py
has always reported).
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

EVAL_BATCH = 16


def train(config_spec, workdir, packing):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config",
                           config_spec, "--workdir", workdir,
                           f"--config.data.packing={packing}", "--config.sample_at_end=False"],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])


def val_batches(config, segments):
    """Every validation window of the config's source, as batches of EVAL_BATCH rows."""
    from jaxmix.data import packing
    from jaxmix.data.text import load_text
    text = load_text(config)
    width = config.train.seq_len + 1
    if segments:
        windows = packing.val_windows(text.val.doc_starts, width)
        rows = [packing.piece_rows(text.val, windows[i:i + EVAL_BATCH], width)
                for i in range(0, len(windows), EVAL_BATCH)]
    else:
        starts = np.arange(text.val.n_tokens // width) * width
        rows = [packing.window_rows(text.val, starts[i:i + EVAL_BATCH], width, False)
                for i in range(0, len(starts), EVAL_BATCH)]
    return rows, text.bytes_per_token


def evaluate(model, params, batches, bytes_per_token):
    import jax
    import jax.numpy as jnp

    from jaxmix.train.step import bits_per_byte, scored_terms

    @jax.jit
    def sums(params, batch):
        ce_BL, mask_BL, _, _ = scored_terms(model, params, batch)
        mask_BL = jnp.ones_like(ce_BL) if mask_BL is None else mask_BL
        return jnp.sum(ce_BL * mask_BL), jnp.sum(mask_BL)

    nats = count = 0.0
    for batch in batches:
        n, c = sums(params, batch)
        nats, count = nats + float(n), count + float(c)
    return bits_per_byte(nats / count, bytes_per_token), int(count)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/mamba_lm.py")
    ap.add_argument("--out", default="runs/packing")
    a = ap.parse_args()
    from jaxmix import workdir as workdir_lib
    results = {}
    for packing_mode in ("concat", "segments"):
        workdir = os.path.join(a.out, packing_mode)
        train(a.config, workdir, packing_mode)
        model, params, config = workdir_lib.load_workdir(workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        last = [r for r in rows if "val_bpb" in r][-1]
        for kind, segments in (("concat", False), ("per document", True)):
            batches, bytes_per_token = val_batches(config, segments)
            bpb, scored = evaluate(model, params, batches, bytes_per_token)
            results[(packing_mode, kind)] = bpb
            print(json.dumps({"trained_with": packing_mode, "evaluated": kind,
                              "val_bpb": round(bpb, 4), "scored_targets": scored,
                              "train_py_val_bpb": round(last["val_bpb"], 4),
                              "steps": last["step"]}), flush=True)
    print(json.dumps({"baseline": "concat model, concat evaluation",
                      "segments_minus_baseline_per_document": round(
                          results[("segments", "per document")]
                          - results[("concat", "per document")], 4),
                      "segments_minus_baseline_concat": round(
                          results[("segments", "concat")] - results[("concat", "concat")], 4)}))


if __name__ == "__main__":
    main()
