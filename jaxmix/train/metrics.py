"""Run outputs: metrics.jsonl, TensorBoard events, the loss plot. Process 0 only."""
import json
import os

import jax


class MetricsWriter:
    """Appends one JSON object per log/eval step and mirrors scalars to TensorBoard."""

    def __init__(self, workdir, resume_step=0):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if not self.active:
            return
        self._truncate_after(resume_step)
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # optional; metrics.jsonl is the source of truth
            self.tb = None

    def _truncate_after(self, step):
        """Drops rows past the resume step (written before a crash, to be redone)."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(rows)

    def write(self, step, scalars):
        if not self.active:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "step":
                    self.tb.add_scalar(key, value, int(step))

    def close(self):
        if self.tb is not None:
            self.tb.close()


def read_rows(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(workdir, title=""):
    """Writes loss.png: train loss and validation loss (nats/byte) against step."""
    if jax.process_index() != 0:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_rows(workdir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(workdir, "loss.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
