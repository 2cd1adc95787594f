"""The training run: `run(config, workdir)` trains, evaluates, checkpoints, resumes."""
import contextlib
import logging
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from jaxmix import data, models, parallel, workdir as workdir_lib
from jaxmix.errors import ConfigError, WriteError, is_write_failure, reason
from jaxmix.train import objectives, optimizer, preempt, validate
from jaxmix.train import state as state_lib
from jaxmix.train.metrics import MetricsWriter, plot_losses
from jaxmix.train import guard as guard_lib
from jaxmix.train.step import NONFINITE, bits_per_byte, make_eval_step, make_train_step

log = logging.getLogger("jaxmix")


def scalars(metrics):
    """The loggable scalars of a step's metrics (not its per-param flags)."""
    return {k: v for k, v in metrics.items() if k not in (NONFINITE, "finite")}


@contextlib.contextmanager
def writes_checked(ckpt, workdir):
    """A write that fails for want of space (or a size limit, or a read-only
    filesystem) becomes one WriteError naming the last complete checkpoint."""
    try:
        yield
    except OSError as e:
        if not is_write_failure(e):
            raise
        raise ckpt.write_failed(e.filename or f"the workdir {workdir}", e) from None


def evaluate(eval_step, params, val_batches, to_global):
    """(mean validation cross-entropy in nats per scored target, accuracy of the argmax
    prediction on them) over the fixed validation batches."""
    nats, count, correct = np.sum([np.asarray(eval_step(params, to_global(b)))
                                   for b in val_batches], axis=0)
    return float(nats / count), float(correct / count)


class Run:
    """Everything a training run builds before its first step."""

    def __init__(self, config, workdir, devices=None):
        validate.check_config(config)
        validate.check_workdir_path(workdir, config.get("init_from", ""))
        self.config, self.workdir = config, workdir
        self.is_main = jax.process_index() == 0
        self.mesh = parallel.make_mesh(config.mesh, devices)
        validate.check_mesh(config, self.mesh, jax.process_count())
        self.rules = parallel.rules_of(config)
        self.model = models.build(config.model)
        self.tx, self.lr = optimizer.make(config.train)
        self.init_fn, self.shardings, self.abstract = state_lib.create(
            self.model, self.tx, self.mesh, self.rules, config.train.seq_len, config.train.seed)
        # Encoder batches mix ranks (labels [B], patches [B, L, F]): split dim 0 only.
        self.is_encoder = config.model.get("family", "lm") == "encoder"
        self.batch_sharding = parallel.batch_sharding(self.mesh, self.rules,
                                                      ndim=1 if self.is_encoder else 2)
        part, self.batch_slices = parallel.process_batch_slice(self.batch_sharding,
                                                                config.train.batch_size)
        self.data = data.build(config, process_index=part, process_count=self.batch_slices)
        validate.check_classes(config, self.data)
        validate.check_vocab(config, self.data)
        checkpoints = os.path.join(os.path.abspath(workdir), "checkpoints")
        resuming = bool(workdir_lib.checkpoint_steps(checkpoints))
        validate.check_workdir(config, workdir, resuming)
        # Loaded (and checked against the model) before anything is written.
        self.fresh_state = (self.state_from(config.init_from)
                            if config.get("init_from") and not resuming else None)
        try:
            os.makedirs(workdir, exist_ok=True)
            self.ckpt = workdir_lib.Checkpointer(checkpoints, keep=config.train.keep_checkpoints)
            if self.is_main:
                workdir_lib.write_config(config, workdir)
                tokenizer = getattr(self.data, "tokenizer", None)
                if tokenizer is not None and tokenizer.kind != "bytes":
                    tokenizer.save(os.path.join(workdir, "tokenizer"))  # for generate
        except OSError as e:
            error = WriteError if is_write_failure(e) else ConfigError
            raise error(f"--workdir {workdir}: cannot write {e.filename or 'there'} "
                        f"({reason(e)}); give a folder you can write") from None
        self.train_step = make_train_step(self.model, self.tx, self.lr, self.mesh, self.rules,
                                          self.shardings, self.batch_sharding,
                                          seed=config.train.seed)
        self.eval_step = make_eval_step(self.model, self.mesh, self.rules,
                                        self.shardings.params, self.batch_sharding)

    def to_global(self, local_batch):
        """A global batch (array or dict of arrays) from this process's rows."""
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
            self.batch_sharding, np.asarray(x)), local_batch)

    def initial_state(self):
        """(state, data iterator, start step): fresh, or restored from the latest checkpoint."""
        found = self.ckpt.restore_latest(self.abstract, self.data.train_iter)
        if found is None and self.fresh_state is not None:
            state, self.fresh_state = self.fresh_state, None  # not held for the whole run
            return state, self.data.train_iter, 0
        if found is None:
            return self.init_fn(), self.data.train_iter, 0
        latest, state, data_ok = found
        it = self.data.train_iter if data_ok else self.data.seek(latest)
        log.info("resumed from step %d in %s", latest, self.workdir)
        return state, it, latest


    def state_from(self, path):
        """A fresh train state whose params come from an HF directory or a jaxmix workdir.
        An encoder takes every param the checkpoint has for it (a pretrained backbone)
        and starts the rest (a new head) from its own init."""
        if self.is_encoder:
            params = models.graft(self.init_fn().params, workdir_lib.load_params(path),
                                  f"init_from={path}")
        else:
            params = workdir_lib.load_params(path, self.model)
        state = state_lib.from_params(params, self.tx, self.shardings)
        log.info("initialised params from %s", path)
        return state

    def print_sample(self, params, prompt="def ", n_tokens=120):
        """A short sample at the end of a run (text language models, process 0), encoded
        and decoded with the data's tokenizer."""
        if not self.is_main or not self.data.is_text or self.is_encoder:
            return
        from jaxmix.sampling import encode_prompt, generate
        tok = self.data.tokenizer
        ids = encode_prompt(tok, prompt, self.config.model.vocab_size)
        out = generate(self.model, params, ids, max_new_tokens=n_tokens, temperature=0.8,
                       rng=jax.random.PRNGKey(0))
        text = tok.decode(np.asarray(out)[0])
        print(f"--- sample ---\n{prompt}{text}\n--------------", flush=True)


def run(config, workdir):
    """Trains `config` in `workdir`; returns the last validation metrics: val_loss
    (nats per scored target), val_acc, and val_bpb for byte text."""
    r = Run(config, workdir)
    with writes_checked(r.ckpt, workdir):
        return train(r)


class Throughput:
    """Training tokens per second between two log lines; time spent compiling and
    evaluating (`pause`) is left out."""

    def __init__(self):
        self.since, self.tokens, self.paused = time.perf_counter(), 0, 0.0

    def pause(self, t0):
        """Leaves out the time since `t0` (a perf_counter reading)."""
        self.paused += time.perf_counter() - t0

    def rate(self):
        """Tokens per second since the last call (or the start), then starts over."""
        now = time.perf_counter()
        tok_s = self.tokens / max(now - self.since - self.paused, 1e-9)
        self.since, self.tokens, self.paused = now, 0, 0.0
        return tok_s


class Loop:
    """The step loop of a built Run: one train step per batch, then logging, validation,
    saving and stopping as the config's intervals and the signals say."""

    def __init__(self, r, start):
        self.r, self.t = r, r.config.train
        self.writer = MetricsWriter(r.workdir, resume_step=start)
        self.val_batches = r.data.val_batches()
        self.compiled = {}
        self.speed = Throughput()
        self.stop = preempt.StopRequest()
        self.guard = guard_lib.NonFiniteGuard(self.t, models.named_params(r.abstract.params),
                                              r.ckpt, r.workdir)
        self.bar = tqdm(total=self.t.steps, initial=start, disable=not r.is_main, unit="step",
                        dynamic_ncols=True)

    def step_fn(self, state, batch):
        """The train step compiled for this batch's shape (a length warm-up makes two)."""
        shape = jax.tree.leaves(batch)[0].shape
        if shape not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[shape] = self.r.train_step.compile(state, batch)
            log.info("train step for batches %s compiled in %.1fs", shape,
                     time.perf_counter() - t0)
            # (imported here: `python -m jaxmix.train.memory` runs that module as a script)
            from jaxmix.train.memory import compiled_warning
            warning = compiled_warning(self.compiled[shape], self.r.mesh.local_devices)
            if warning and self.r.is_main:
                log.warning(warning)
            self.speed.pause(t0)
        return self.compiled[shape]

    def log_metrics(self, step, metrics):
        metrics = scalars(jax.device_get(metrics))
        if self.guard.skipped:
            metrics["nonfinite_skipped"] = self.guard.skipped
        tok_s = self.speed.rate()
        self.writer.write(step, {**metrics, "tokens_per_sec": tok_s})
        self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tok_s:,.0f}")

    def validate(self, step, params):
        """Validation metrics at `step`, written to the metrics file and said in one line."""
        t0 = time.perf_counter()
        r = self.r
        val, acc = evaluate(r.eval_step, params, self.val_batches, r.to_global)
        metrics = {"val_loss": val, "val_acc": acc}
        if r.data.is_text and not r.is_encoder:  # an LM: bits per byte
            metrics["val_bpb"] = bits_per_byte(val, r.data.bytes_per_token)
            self.bar.write(f"step {step}: validation loss {val:.4f} nats, "
                           f"{metrics['val_bpb']:.3f} bits/byte")
        else:
            self.bar.write(f"step {step}: validation loss {val:.4f} nats, accuracy "
                           f"{100 * acc:.2f}% on the scored targets")
        self.writer.write(step, metrics)
        self.speed.pause(t0)
        return metrics

    def save(self, step, state, it, periodic, stopping):
        """A periodic save, and when stopping a forced one unless this step is saved."""
        if periodic:
            self.r.ckpt.save(step, state, it)
        if stopping and self.r.ckpt.latest_step() != step:
            self.r.ckpt.save(step, state, it, force=True)

    def run(self, state, it, start):
        """Steps start + 1 .. train.steps (fewer when stopped): (state, the last step,
        the last validation metrics)."""
        t, guard = self.t, self.guard
        pending = None  # (step, metrics) whose non-finite flags are not checked yet
        step, val_metrics = start, {}
        for step in range(start + 1, t.steps + 1):
            batch = self.r.to_global(next(it))
            step_fn = self.step_fn(state, batch)
            with jax.set_mesh(self.r.mesh):
                state, metrics = step_fn(state, batch)
            # The previous step's flags are ready by now: checking them here keeps one
            # step in flight. A step to be saved is checked before its save.
            if pending is not None:
                guard.check_step(*pending)
            pending = (step, metrics)
            self.speed.tokens += objectives.positions(batch)
            self.bar.update(1)
            last = step == t.steps
            if step % t.log_every == 0 or last:
                self.log_metrics(step, metrics)
            if step % t.eval_every == 0 or last:
                val_metrics = self.validate(step, state.params)
            periodic = step % t.checkpoint_every == 0 or last
            stopping = self.stop.reached(step)
            if periodic or stopping:
                guard.check_step(*pending)
                pending = None
                self.save(step, state, it, periodic, stopping)
            if stopping:
                break
        if pending is not None:
            guard.check_step(*pending)
        return state, step, val_metrics

    def close(self, raise_errors):
        """Ends the progress bar, the signal handlers, the saves in flight (waited for;
        a failed one raised when `raise_errors`) and the metrics file."""
        self.bar.close()  # before any error line
        self.stop.restore()
        try:
            self.r.ckpt.close(raise_errors=raise_errors)
        finally:
            self.writer.close()


def train(r):
    """The training loop of a built Run (see `run`)."""
    config, workdir = r.config, r.workdir
    n_params = state_lib.param_count(r.abstract)
    log.info("model: %s params, mesh %s, data: %s", f"{n_params:,}", dict(r.mesh.shape),
             r.data.describe())
    state, it, start = r.initial_state()
    loop = Loop(r, start)
    loop.stop.install()  # SIGTERM / SIGINT: save, then stop
    try:
        state, step, val_metrics = loop.run(state, it, start)
    except BaseException:
        loop.close(raise_errors=False)  # the run's own error is the one to show
        raise
    loop.close(raise_errors=True)  # a failed last save is raised
    if loop.stop.name is not None:
        log.info("stopped at step %d on %s: checkpoint saved in %s; rerun the same "
                 "command to resume", step, loop.stop.name,
                 os.path.join(workdir, "checkpoints"))
        return val_metrics
    plot_losses(workdir, title=os.path.basename(os.path.normpath(workdir)))
    if config.get("sample_at_end", True):
        r.print_sample(state.params)
    return val_metrics
