"""Grain pipelines: windows of a text source's token stream (`jaxmix.data.text`: bytes
or a tokenizer, in memory or streamed from prepared ArrayRecord shards), or synthetic
task examples; train iterator and validation batches.

Each split's token stream is cut into non-overlapping windows of
`seq_len + 1` tokens (inputs plus the shifted target), with document segments when
`data.packing = "segments"` (see `jaxmix.data.packing`). Training walks a
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

from jaxmix.data import packing, synthetic
from jaxmix.data.step_pipeline import StepPipeline
from jaxmix.data.text import load_text
from jaxmix.errors import ConfigError

class _GatherRows:
    """Map fn: global batch of window indices [B] -> this process's rows [b, L+1]
    (a dict with segment ids, positions and loss mask when packing segments)."""

    def __init__(self, stream, window, row_start, row_stop, segments):
        self.stream, self.window, self.segments = stream, window, segments
        self.row_start, self.row_stop = row_start, row_stop

    def __call__(self, idx_B):
        idx_b = np.asarray(idx_B, np.int64)[self.row_start:self.row_stop]
        return packing.window_rows(self.stream, idx_b * self.window, self.window,
                                   self.segments)

    def __repr__(self):
        return f"_GatherRows(rows=[{self.row_start}, {self.row_stop}))"


class Pipeline(StepPipeline):
    """The data a training run consumes from a text source; built by `build(config, ...)`.

    Attributes:
      train_iter: grain `DatasetIterator` yielding this process's rows of every global
        batch forever: int32 [local_batch, seq_len+1], or with segments a dict of
        tokens, segment_ids, positions [local_batch, seq_len+1] and loss_mask
        [local_batch, seq_len]; checkpointable with get_state()/set_state() and
        `grain.checkpoint.CheckpointSave/CheckpointRestore`.
      local_batch, global_batch, seq_len, process_index, process_count.
      text: the `jaxmix.data.text.TextData` (streams, tokenizer); corpus: its in-memory
        Corpus or None.
      is_text: True (validation is reported in bits per byte), bytes_per_token.
    """
    is_text = True

    def __init__(self, text, *, seq_len, global_batch, eval_batches, seed, shuffle,
                 process_index, process_count, segments=False):
        self.text, self.corpus, self.tokenizer = text, text.corpus, text.tokenizer
        self.bytes_per_token = text.bytes_per_token
        self.seq_len, self.window, self.segments = seq_len, seq_len + 1, segments
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.eval_batches = eval_batches
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = process_index
        self.process_count = process_count
        self.n_train_windows = text.train.n_tokens // self.window
        self._row_start = process_index * self.local_batch
        self._row_stop = self._row_start + self.local_batch
        self._val_cache = None
        self.train_dataset = self._train_dataset()
        self.train_iter = self.new_train_iter()

    def _train_dataset(self):
        """Infinite MapDataset of this process's train batches, indexed by step."""
        ds = grain.MapDataset.range(self.n_train_windows)
        if self.shuffle:
            # ShuffleMapDataset folds the epoch into the seed: reshuffled per epoch.
            ds = ds.shuffle(seed=self.seed % 2**32)
        ds = ds.repeat()  # infinite; batches below may span an epoch boundary
        ds = ds.batch(self.global_batch, drop_remainder=True)
        return ds.map(_GatherRows(self.text.train, self.window, self._row_start,
                                  self._row_stop, self.segments))

    def val_windows(self):
        """Validation windows: stream offsets (concat), or per-document windows."""
        if self.segments:
            return packing.val_windows(self.text.val.doc_starts, self.window)
        return np.arange(self.text.val.n_tokens // self.window) * self.window

    def val_batches(self):
        """`eval_batches` batches [local_batch, seq_len+1], the same every call.

        The eval_batches * B windows are spread evenly over the whole validation
        split (not its first files), wrapping only when there are fewer windows than
        that; row r of batch k takes window pick[k*B + r]; rows are sharded by process.
        With segments the windows hold whole documents (see `packing.val_windows`).
        """
        if self._val_cache is None:
            windows = self.val_windows()
            n_val, n_pick = len(windows), self.eval_batches * self.global_batch
            pick = (np.arange(n_pick) * max(n_val // n_pick, 1)) % n_val
            rows_b = np.arange(self._row_start, self._row_stop)
            batches = []
            for k in range(self.eval_batches):
                idx_b = pick[k * self.global_batch + rows_b]
                if self.segments:
                    batch = packing.piece_rows(self.text.val, [windows[i] for i in idx_b],
                                               self.window)
                else:
                    batch = packing.window_rows(self.text.val, windows[idx_b], self.window,
                                                False)
                for leaf in _leaves(batch):
                    leaf.flags.writeable = False
                batches.append(batch)
            self._val_cache = batches
        return list(self._val_cache)

    def describe(self):
        """One line for the log: the source, its splits and the windows."""
        text = self.text
        packing_note = "documents as segments" if self.segments else "documents concatenated"
        return (f"{text.source}: {text.summary}; tokenizer "
                f"{text.tokenizer.describe()}; {self.n_train_windows:,} train windows of "
                f"{self.window} tokens, {packing_note}; batch {self.global_batch} = "
                f"{self.process_count} x {self.local_batch}")


def _leaves(batch):
    return list(batch.values()) if isinstance(batch, dict) else [batch]


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


def _check_text(text, config):
    batch_size, window = config.train.batch_size, config.train.seq_len + 1
    n_train = text.train.n_tokens // window
    if n_train < batch_size:
        raise ConfigError(
            f"train.seq_len/train.batch_size: the train split of {text.source!r} has "
            f"{text.train.n_tokens:,} tokens = {n_train} windows of {window} tokens, "
            f"fewer than one batch of {batch_size}; lower train.seq_len or "
            f"train.batch_size, or add data")
    if text.val.n_tokens < window and config.data.get("packing", "concat") == "concat":
        raise ConfigError(
            f"train.seq_len: the validation split of {text.source!r} has "
            f"{text.val.n_tokens:,} tokens, less than one window of {window} tokens; "
            f"lower train.seq_len, raise data.val_fraction, or add data")


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
        from jaxmix.data.audio import AudioPipeline
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
    packing_mode = config.data.get("packing", "concat")
    if packing_mode not in packing.PACKINGS:
        raise ConfigError(f"data.packing={packing_mode!r}: use 'concat' (documents run "
                          f"together) or 'segments' (each document its own segment)")
    text = load_text(config)
    _check_text(text, config)
    return Pipeline(text, seq_len=config.train.seq_len,
                    global_batch=config.train.batch_size,
                    eval_batches=config.train.eval_batches,
                    seed=int(config.train.seed),
                    shuffle=bool(config.data.get("shuffle", True)),
                    process_index=process_index, process_count=process_count,
                    segments=packing_mode == "segments")
