"""Does masked-patch pretraining pay off? SSAMBA on the synthetic audio-event task.

  python benchmarks/bench_ssl.py [--pretrain_steps 1500] [--finetune_steps 300]
      [--label_fraction 0.1] [--preset ssamba] [--workdir runs/bench_ssl]

Three train.py runs of configs/audio_encoder.py: `PRESET-pretrain` (InfoNCE + 10 x MSE
on cluster-masked patches of every training clip, no labels), then `PRESET` fine-tuned
with `label_fraction` of the training labels from the pretrained workdir
(init_from), and the baseline in the same run: the same fine-tuning from scratch. One
JSON line per run (held-out accuracy on the validation clips, wall seconds), then the
gain in accuracy points.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(preset, workdir, *overrides):
    """Runs train.py; returns (last val_acc, wall seconds)."""
    shutil.rmtree(workdir, ignore_errors=True)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"),
           "--config", os.path.join(ROOT, f"configs/audio_encoder.py:{preset}"),
           "--workdir", workdir, *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    acc = None
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            acc = json.loads(line).get("val_acc", acc)
    return acc, seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="ssamba")
    ap.add_argument("--pretrain_steps", type=int, default=1500)
    ap.add_argument("--finetune_steps", type=int, default=300)
    ap.add_argument("--label_fraction", type=float, default=0.1)
    ap.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench_ssl"))
    a = ap.parse_args()
    steps = lambda n: [f"--config.train.steps={n}", f"--config.train.decay_steps={n}",
                       f"--config.train.eval_every={n}"]
    pre = os.path.join(a.workdir, "pretrain")
    ft = steps(a.finetune_steps) + [f"--config.data.audio.label_fraction={a.label_fraction}"]
    rows = {}
    for name, preset, args in (
            ("pretrain", f"{a.preset}-pretrain", steps(a.pretrain_steps)),
            ("finetune_pretrained", a.preset, ft + [f"--config.init_from={pre}"]),
            ("finetune_scratch", a.preset, ft)):
        acc, seconds = train(preset, os.path.join(a.workdir, name), *args)
        rows[name] = acc
        print(json.dumps(dict(bench="ssl", run=name, preset=preset, val_acc=acc,
                              wall_seconds=round(seconds, 1),
                              label_fraction=None if name == "pretrain" else a.label_fraction)),
              flush=True)
    print(json.dumps(dict(bench="ssl", gain_points=round(
        100 * (rows["finetune_pretrained"] - rows["finetune_scratch"]), 2))), flush=True)


if __name__ == "__main__":
    main()
