"""Grain pipelines: packed byte streams, or synthetic task examples; train iterator
and validation batches.

Each split's token stream is cut into non-overlapping windows of
`seq_len + 1` tokens (inputs plus the shifted target). Training walks a
grain `MapDataset` of window indices, shuffled with `train.seed` and
reshuffled every epoch, batched to the GLOBAL batch size (batches may span an
epoch boundary, so every window is seen once per epoch), and each process
gathers only its rows `[p*B/P, (p+1)*B/P)` of every global batch: the union
over processes is exactly the single-process batch.

Synthetic tasks (`data.source = "synthetic:NAME"`, see `jaxmix.data.synthetic`)
make global batch `step` from (train.seed, step) alone, each process only its rows,
and yield dicts {"tokens": [b, seq_len+1], "loss_mask": [b, seq_len]}: only the
masked targets are scored.

The train iterator's state is `{"next_index": step}` (global batches
consumed), identical on every process, so `seek(step)` rebuilds it after the
process count changed between save and restore.
"""
import grain
import numpy as np

from jaxmix.data import synthetic
from jaxmix.data.corpus import load_corpus
from jaxmix.errors import ConfigError

# Background prefetch of the train iterator: one thread, a few batches ahead.
PREFETCH_THREADS = 1
PREFETCH_BATCHES = 4


def windows_view(stream_u8, window):
    """[n_windows, window] view of a flat uint8 stream (tail dropped, no copy)."""
    n_windows = len(stream_u8) // window
    return stream_u8[:n_windows * window].reshape(n_windows, window)


class _GatherRows:
    """Map fn: global batch of window indices [B] -> this process's tokens [b, L+1]."""

    def __init__(self, windows_NW, row_start, row_stop):
        self.windows_NW = windows_NW
        self.row_start = row_start
        self.row_stop = row_stop

    def __call__(self, idx_B):
        idx_b = np.asarray(idx_B)[self.row_start:self.row_stop]
        return self.windows_NW[idx_b].astype(np.int32)

    def __repr__(self):
        return f"_GatherRows(rows=[{self.row_start}, {self.row_stop}))"


class StepPipeline:
    """A train dataset indexed by step, iterated with background prefetch."""

    def set_rows(self, config, process_index, process_count):
        """Batch sizes, seed and this process's rows [p*b, (p+1)*b) of every global batch."""
        self.global_batch = config.train.batch_size
        self.local_batch = self.global_batch // process_count
        self.eval_batches = config.train.eval_batches
        self.seed = int(config.train.seed)
        self.process_index, self.process_count = process_index, process_count
        start = process_index * self.local_batch
        self.rows = range(start, start + self.local_batch)

    def new_train_iter(self):
        """A fresh train iterator positioned at step 0."""
        read_options = grain.ReadOptions(num_threads=PREFETCH_THREADS,
                                         prefetch_buffer_size=PREFETCH_BATCHES)
        return iter(self.train_dataset.to_iter_dataset(read_options))

    def seek(self, step):
        """A new train iterator as if `step` batches had been consumed.

        Also becomes `self.train_iter` (the previous iterator is left as is).
        """
        if step < 0:
            raise ValueError(f"seek: step must be >= 0, got {step}")
        it = self.new_train_iter()
        it.set_state({"next_index": int(step)})
        self.train_iter = it
        return it


class Pipeline(StepPipeline):
    """The data a training run consumes; built by `build(config, ...)`.

    Attributes:
      train_iter: grain `DatasetIterator` yielding int32 [local_batch, seq_len+1]
        forever; checkpointable with get_state()/set_state() and
        `grain.checkpoint.CheckpointSave/CheckpointRestore`.
      local_batch, global_batch, seq_len, process_index, process_count, corpus.
      is_text: True (byte text: validation is reported in bits per byte).
    """
    is_text = True

    def __init__(self, corpus, *, seq_len, global_batch, eval_batches, seed,
                 shuffle, process_index, process_count):
        self.corpus = corpus
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.eval_batches = eval_batches
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = process_index
        self.process_count = process_count
        self.train_windows_NW = windows_view(corpus.train_u8, seq_len + 1)
        self.val_windows_NW = windows_view(corpus.val_u8, seq_len + 1)
        self._row_start = process_index * self.local_batch
        self._row_stop = self._row_start + self.local_batch
        self._val_cache = None
        self.train_dataset = self._train_dataset()
        self.train_iter = self.new_train_iter()

    def _train_dataset(self):
        """Infinite MapDataset of this process's train batches, indexed by step."""
        ds = grain.MapDataset.range(len(self.train_windows_NW))
        if self.shuffle:
            # ShuffleMapDataset folds the epoch into the seed: reshuffled per epoch.
            ds = ds.shuffle(seed=self.seed % 2**32)
        ds = ds.repeat()  # infinite; batches below may span an epoch boundary
        ds = ds.batch(self.global_batch, drop_remainder=True)
        return ds.map(_GatherRows(self.train_windows_NW, self._row_start, self._row_stop))

    def val_batches(self):
        """`eval_batches` int32 arrays [local_batch, seq_len+1], same every call.

        The eval_batches * B windows are spread evenly over the whole validation
        stream (not its first files), wrapping only when there are fewer windows than
        that; row r of batch k takes window pick[k*B + r]; rows are sharded by process.
        """
        if self._val_cache is None:
            n_val = len(self.val_windows_NW)
            n_pick = self.eval_batches * self.global_batch
            pick = (np.arange(n_pick) * max(n_val // n_pick, 1)) % n_val
            rows_b = np.arange(self._row_start, self._row_stop)
            batches = []
            for k in range(self.eval_batches):
                idx_b = pick[k * self.global_batch + rows_b]
                batch = self.val_windows_NW[idx_b].astype(np.int32)
                batch.flags.writeable = False
                batches.append(batch)
            self._val_cache = batches
        return list(self._val_cache)

    def describe(self):
        """One line for the log: files, bytes and windows of each split."""
        c, window = self.corpus, self.seq_len + 1
        n_files = len(set(c.train_files) | set(c.val_files))
        line = (f"data {c.source} ({c.root}): {n_files} files; "
                f"train {len(c.train_files)} files {len(c.train_u8):,} bytes "
                f"{len(self.train_windows_NW):,} windows / "
                f"val {len(c.val_files)} files {len(c.val_u8):,} bytes "
                f"{len(self.val_windows_NW):,} windows; window {window} tokens, "
                f"batch {self.global_batch} = {self.process_count} x {self.local_batch}")
        return line + (f"; {c.note}" if c.note else "")


def _check_shapes(config, process_index, process_count):
    batch_size, seq_len = config.train.batch_size, config.train.seq_len
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in "
                         f"[0, process_count={process_count})")
    if batch_size < 1:
        raise ConfigError(f"train.batch_size: {batch_size} must be positive")
    if seq_len < 1:
        raise ConfigError(f"train.seq_len: {seq_len} must be positive")
    if config.train.eval_batches < 0:
        raise ConfigError(f"train.eval_batches: {config.train.eval_batches} "
                          f"must be >= 0")
    if batch_size % process_count:
        raise ConfigError(f"train.batch_size: {batch_size} is not divisible by the "
                          f"process count {process_count}; use a multiple of "
                          f"{process_count}")


def _check_corpus(corpus, config):
    batch_size, seq_len = config.train.batch_size, config.train.seq_len
    window = seq_len + 1
    n_train = len(corpus.train_u8) // window
    n_val = len(corpus.val_u8) // window
    if n_train < batch_size:
        raise ConfigError(
            f"train.seq_len/train.batch_size: the train split of "
            f"{corpus.source!r} has {len(corpus.train_u8):,} bytes = {n_train} "
            f"windows of {window} tokens, fewer than one batch of {batch_size}; "
            f"lower train.seq_len or train.batch_size, or add data")
    if n_val < 1:
        raise ConfigError(
            f"train.seq_len: the validation split of {corpus.source!r} has "
            f"{len(corpus.val_u8):,} bytes, less than one window of {window} "
            f"tokens; lower train.seq_len, raise data.val_fraction, or add data")


class _MakeRows:
    """Map fn: step -> this process's rows of the synthetic global batch `step`."""

    def __init__(self, name, args, seq_len, seed, split, rows):
        self.name, self.args, self.seq_len = name, args, seq_len
        self.seed, self.split, self.rows = seed, split, rows

    def __call__(self, step):
        seq_len = synthetic.step_len(self.args, self.seq_len, int(step))
        return synthetic.make_batch(self.name, self.args, seq_len, self.seed, self.split,
                                    int(step), self.rows)

    def __repr__(self):
        return f"_MakeRows({self.name}, rows=[{self.rows.start}, {self.rows.stop}))"


class SyntheticPipeline(StepPipeline):
    """Fresh synthetic examples every step (see `jaxmix.data.synthetic`); the same
    interface as `Pipeline`, with dict batches that carry a loss mask."""
    is_text = False
    STEPS = 2**62  # "infinite": batches are made on demand from (seed, step)

    def __init__(self, config, *, process_index, process_count):
        self.name = synthetic.task_name(config)
        self.seq_len = config.train.seq_len
        self.set_rows(config, process_index, process_count)
        self.args = synthetic.task_args(config, "train")
        self._val_args = synthetic.task_args(config, "val")
        self.train_dataset = grain.MapDataset.range(self.STEPS).map(
            _MakeRows(self.name, self.args, self.seq_len, self.seed, "train", self.rows))
        self.train_iter = self.new_train_iter()
        self._val_cache = None

    def val_batches(self):
        """`eval_batches` fixed batches from the validation stream (another seed
        stream; passkey filler from the corpus's validation split)."""
        if self._val_cache is None:
            self._val_cache = [synthetic.make_batch(self.name, self._val_args, self.seq_len,
                                                    self.seed, "val", k, self.rows)
                               for k in range(self.eval_batches)]
        return list(self._val_cache)

    def describe(self):
        settings = {k: v for k, v in self.args.items() if k != "filler_u8"}
        scored = int(self.val_batches()[0]["loss_mask"].sum()) if self.eval_batches else 0
        return (f"synthetic task {self.name} {settings}: fresh examples of "
                f"{self.seq_len + 1} tokens each step, batch {self.global_batch} = "
                f"{self.process_count} x {self.local_batch}; {scored} scored targets "
                f"in the first validation batch")


def build(config, process_index=0, process_count=1):
    """Build the data pipeline for one process from `config.data` and `config.train`."""
    _check_shapes(config, process_index, process_count)
    source = config.data.source
    if isinstance(source, str) and (source == "audio:synthetic" or source.startswith("wav:")):
        from jaxmix.data.audio import AudioPipeline  # audio imports StepPipeline from here
        return AudioPipeline(config, process_index=process_index,
                             process_count=process_count)
    if isinstance(source, str) and source.startswith("synthetic:"):
        if "synthetic" not in config.data:
            raise ConfigError("data.synthetic: missing; synthetic sources take their "
                              "settings from it (see configs/synthetic.py)")
        synthetic.check(synthetic.task_name(config), synthetic.task_args(config),
                        config.train.seq_len)
        return SyntheticPipeline(config, process_index=process_index,
                                 process_count=process_count)
    corpus = load_corpus(config.data.source, float(config.data.val_fraction))
    _check_corpus(corpus, config)
    return Pipeline(corpus, seq_len=config.train.seq_len,
                    global_batch=config.train.batch_size,
                    eval_batches=config.train.eval_batches,
                    seed=int(config.train.seed),
                    shuffle=bool(config.data.get("shuffle", True)),
                    process_index=process_index, process_count=process_count)
