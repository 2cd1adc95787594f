"""The base of every data pipeline whose train batches are indexed by step: this
process's rows of each global batch, a prefetching train iterator and `seek`."""
import grain

# Background prefetch of the train iterator: one thread, a few batches ahead.
PREFETCH_THREADS = 1
PREFETCH_BATCHES = 4


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
