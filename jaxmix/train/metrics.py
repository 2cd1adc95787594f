"""Run outputs: metrics.jsonl, TensorBoard events, the loss plot. Process 0 only.

Every write happens in the training thread, so a full disk raises an OSError there
(the loop turns it into one error line) instead of stalling a background writer."""
import json
import os
import socket
import time

import jax


class EventFile:
    """TensorBoard scalars, written and flushed synchronously (tensorboardX's own
    SummaryWriter queues them for a thread that dies silently on a write error, and
    then blocks the run on its full queue)."""

    def __init__(self, logdir):
        from tensorboardX.proto import event_pb2
        from tensorboardX.record_writer import RecordWriter
        from tensorboardX.summary import scalar
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}"
        self._event, self._scalar = event_pb2.Event, scalar
        self.path = os.path.join(logdir, name)
        self._writer = RecordWriter(self.path)
        self._write(self._event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event):
        self._writer.write(event.SerializeToString())
        self._writer.flush()

    def add_scalars(self, step, values):
        for key, value in values.items():
            self._write(self._event(wall_time=time.time(), step=step,
                                    summary=self._scalar(key, value)))

    def close(self):
        self._writer.close()


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
            self.tb = EventFile(os.path.join(workdir, "tensorboard"))
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
        path = self.path
        try:
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.tb is not None:
                path = self.tb.path
                self.tb.add_scalars(int(step), {k: v for k, v in row.items() if k != "step"})
        except OSError as e:  # a full disk: name the file (a flush error has no name)
            e.filename = e.filename or path
            raise

    def close(self):
        if self.tb is not None:
            try:
                self.tb.close()
            except OSError:  # every event was flushed when it was written
                pass


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
