"""Data pipelines (grain): text corpora (bytes or a tokenizer; in memory, or prepared
ArrayRecord shards streamed with `data.source = "arrayrecord:DIR"`, see
jaxmix.data.prepare) packed into windows of seq_len + 1 tokens, with document segments
when data.packing = "segments" (jaxmix.data.packing),
synthetic recall tasks (`data.source = "synthetic:NAME"`, jaxmix.data.synthetic), or
audio clips as log-mel spectrogram patches (`audio:synthetic`, `wav:GLOB`,
jaxmix.data.audio: batches {"patches", "label"[, "mask_idx"]}).

    from jaxmix import data
    pipe = data.build(config, process_index=0, process_count=1)
    batch = next(pipe.train_iter)      # int32 [batch_size // process_count, seq_len + 1]
                                       # segments: {"tokens", "segment_ids", "positions",
                                       #            "loss_mask": [.., seq_len]}
                                       # synthetic: {"tokens": that, "loss_mask": [.., seq_len]}
    pipe.val_batches()                 # list of train.eval_batches such batches
    pipe.describe()                    # one line for the log
    it = pipe.seek(step)               # train iterator after `step` batches
"""
from jaxmix.data.corpus import Corpus, load_corpus
from jaxmix.data.pipeline import Pipeline, SyntheticPipeline, build

__all__ = ["Corpus", "Pipeline", "SyntheticPipeline", "build", "load_corpus"]
