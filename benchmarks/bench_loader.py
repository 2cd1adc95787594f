"""The prepared-corpus loader: throughput against the train step, and memory at scale.

  python benchmarks/bench_loader.py throughput [--corpus DIR]
  python benchmarks/bench_loader.py rss [--big_gib 1.1] [--steps 60]

throughput: the grain pipeline of `data.source = "arrayrecord:DIR"` with document
segments, alone (batches pulled and nothing else), in tokens/s at seq_len 2048 and at
the mamba_lm default shape; the baseline in the same run is what the mamba_lm default
train step consumes (benchmarks/bench_train.py's measurement).

rss: the same train.py run (configs/mamba_lm.py, `--steps` steps) on a corpus of more
than `--big_gib` GiB of token ids and on one of 10 MiB, each in its own process; the
peak resident memory of each (polled every 50 ms) and the difference.

Without --corpus the stdlib sources are prepared (bytes tokenizer) into a temporary
folder; the big corpus repeats that corpus's documents, shuffled with a new seed for
every copy. One JSON line per measurement.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402


def emit(**row):
    print(json.dumps(row), flush=True)


def stdlib_corpus(workdir):
    from jaxmix.data import prepare
    from jaxmix.data.corpus import stdlib_files
    root, _ = stdlib_files()
    out = os.path.join(workdir, "stdlib")
    if prepare.main(["--input", f"{root}/**/*.py", "--tokenizer", "bytes", "--out", out,
                     "--workers", "2"]) != 0:
        sys.exit("preparing the stdlib corpus failed")
    return out


def pipeline(corpus, seq_len, batch_size):
    import ml_collections

    from jaxmix import data
    c = ml_collections.ConfigDict()
    c.train = ml_collections.ConfigDict(dict(batch_size=batch_size, seq_len=seq_len,
                                             eval_batches=1, seed=0))
    c.data = ml_collections.ConfigDict(dict(source=f"arrayrecord:{corpus}", val_fraction=0.02,
                                            shuffle=True, tokenizer="bytes",
                                            packing="segments"))
    return data.build(c)


def loader_tokens_per_sec(corpus, seq_len, batch_size, batches):
    it = pipeline(corpus, seq_len, batch_size).train_iter
    for _ in range(5):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size * seq_len / (time.perf_counter() - t0)


def throughput(a):
    corpus = a.corpus or stdlib_corpus(tempfile.mkdtemp(prefix="jaxmix-loader-"))
    for seq_len, batch in ((2048, 16), (256, 16)):
        emit(what="loader", seq_len=seq_len, batch_size=batch, segments=True,
             tokens_per_sec=round(loader_tokens_per_sec(corpus, seq_len, batch, a.batches)))
    # The train step in a fresh process: the CPU host set-up must precede JAX's start.
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "train_step",
                           "--corpus", corpus, "--train_steps", str(a.train_steps)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    print(proc.stdout.strip().splitlines()[-1], flush=True)


def train_step(a):
    from jaxmix import cpu
    cpu.keep_freed_memory()
    from benchmarks.bench_train import load_config, tokens_per_sec
    config = load_config("configs/mamba_lm.py:default")
    cpu.prepare_training_host(config)
    config.data.update(source=f"arrayrecord:{a.corpus}", packing="segments")
    step_tok_s, _ = tokens_per_sec(config, a.train_steps, 3, tempfile.mkdtemp())
    emit(what="mamba_lm default train step (baseline)", seq_len=config.train.seq_len,
         batch_size=config.train.batch_size, tokens_per_sec=round(step_tok_s))


def copy_corpus(src, out, min_tokens):
    """A corpus of at least `min_tokens` tokens: the train documents of `src` repeated,
    each copy shuffled with its own seed; the validation split copied once."""
    from jaxmix.data import prepare
    from jaxmix.data.tokens import open_corpus
    manifest, train, val = open_corpus(src)
    os.makedirs(out, exist_ok=True)
    dtype = np.dtype(manifest["dtype"])
    splits = {}
    for split, stream, copies in (("train", train, None), ("val", val, 1)):
        docs = list(zip(stream.doc_starts[:-1], stream.doc_starts[1:], strict=True))
        n = copies or -(-min_tokens // stream.n_tokens)  # copies; the last one cut short
        part = prepare.SplitPart(out, f"{split}-00000", dtype, manifest["record_tokens"],
                                 None)
        order = (k for seed in range(n) for k in np.random.default_rng(seed).permutation(len(docs)))
        for k in order:
            a, b = docs[k]
            part.add([(stream.read(int(a), int(b)), int(b - a))])
            if split == "train" and part.tokens + part.n_pending >= min_tokens:
                break
        entry = part.close()
        part.commit(True)
        splits[split] = {"tokens": entry["tokens"], "documents": entry["documents"],
                         "bytes": entry["bytes"], "shards": [entry]}
    prepare.write_json(os.path.join(out, "manifest.json"), {**manifest, "splits": splits})
    return out


def peak_rss(args, env):
    """Runs train.py with `args`; (exit status, peak RSS of its process tree in MiB)."""
    import psutil
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    p, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    err = proc.stderr.read()
    if proc.returncode:
        sys.stderr.write(err[-3000:])
    return proc.returncode, peak / 2**20


def rss(a):
    tmp = tempfile.mkdtemp(prefix="jaxmix-rss-")
    src = a.corpus or stdlib_corpus(tmp)
    itemsize = 2
    big = copy_corpus(src, os.path.join(tmp, "big"), int(a.big_gib * 2**30) // itemsize + 1)
    small = copy_corpus(src, os.path.join(tmp, "small"), 10 * 2**20 // itemsize)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    results = {}
    for name, corpus in (("10MiB", small), ("big", big)):
        size = sum(os.path.getsize(os.path.join(corpus, f)) for f in os.listdir(corpus))
        args = ["--config", "configs/mamba_lm.py", "--workdir", os.path.join(tmp, f"run-{name}"),
                f"--config.data.source=arrayrecord:{corpus}", "--config.data.packing=segments",
                f"--config.train.steps={a.steps}", "--config.sample_at_end=False",
                f"--config.train.eval_every={a.steps}", f"--config.train.checkpoint_every={a.steps}"]
        rc, peak = peak_rss(args, env)
        results[name] = peak
        emit(what="train.py peak RSS", corpus=name, corpus_bytes=size, steps=a.steps,
             exit_status=rc, peak_rss_mib=round(peak, 1))
    emit(what="RSS difference (big - 10MiB)", mib=round(results["big"] - results["10MiB"], 1),
         target_mib=1536)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["throughput", "rss", "train_step"])
    ap.add_argument("--corpus", help="a prepared corpus (default: the stdlib, bytes)")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--train_steps", type=int, default=10)
    ap.add_argument("--big_gib", type=float, default=1.1)
    ap.add_argument("--steps", type=int, default=60)
    a = ap.parse_args()
    {"throughput": throughput, "rss": rss, "train_step": train_step}[a.mode](a)


if __name__ == "__main__":
    main()
