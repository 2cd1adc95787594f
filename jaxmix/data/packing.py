"""Windows of a token stream, with or without document segments.

A split's documents are one stream; training window w is its tokens
[w * W, (w + 1) * W), W = seq_len + 1 (inputs plus the shifted targets), so a document
may run across windows. With `data.packing = "concat"` a window is just its tokens
(what the model sees is one running text). With `"segments"` a window also carries,
for each of its W tokens:
  segment_ids  1, 2, ... numbering the documents in the window (0 is padding),
  positions    the distance from the start of that document's piece in the window
               (0 where a document starts, or where the window cuts into one),
and the loss mask [W - 1] scores a target only when it is in the same document as its
input: no position predicts across a boundary. Attention masks across segments and
restarts RoPE at the positions; the recurrent mixers reset their state where the
segment id changes.

Validation with segments is evaluated per document (`val_windows`): documents are
packed whole into windows, a new window started when the next one does not fit, so
no document is cut unless it is longer than a window; the rest is padding.
"""
import numpy as np

PACKINGS = ("concat", "segments")


def segment_fields(doc_starts, starts_b, width):
    """(segment_ids, positions), int32 [b, width], of the windows starting at the
    stream offsets `starts_b` (doc_starts: int64 [n_docs + 1])."""
    pos_bW = np.asarray(starts_b, np.int64)[:, None] + np.arange(width)
    doc_bW = np.searchsorted(doc_starts, pos_bW, side="right") - 1
    segment_ids = doc_bW - doc_bW[:, :1] + 1
    first_bW = np.maximum(doc_starts[doc_bW], pos_bW[:, :1])
    return segment_ids.astype(np.int32), (pos_bW - first_bW).astype(np.int32)


def loss_mask(segment_ids_bW):
    """float32 [b, W - 1]: 1 where input and target share a (non-padding) segment."""
    seg = segment_ids_bW
    return ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)).astype(np.float32)


def window_rows(stream, starts_b, width, segments):
    """The rows of the windows at `starts_b`: int32 tokens [b, width], or with
    `segments` a dict of tokens, segment_ids, positions [b, width] and loss_mask."""
    tokens = stream.read_rows(starts_b, width).astype(np.int32)
    if not segments:
        return tokens
    seg, pos = segment_fields(stream.doc_starts, starts_b, width)
    return {"tokens": tokens, "segment_ids": seg, "positions": pos,
            "loss_mask": loss_mask(seg)}


def val_windows(doc_starts, width):
    """Per-document validation windows: a list of windows, each a list of (stream
    start, length) pieces placed one after another from the window's start."""
    windows, current, used = [], [], 0
    for start, stop in zip(doc_starts[:-1].tolist(), doc_starts[1:].tolist(), strict=True):
        while stop > start:
            n = min(stop - start, width)
            if used + n > width:
                windows.append(current)
                current, used = [], 0
            current.append((start, n))
            used += n
            start += n
    if current:
        windows.append(current)
    return windows


def piece_rows(stream, windows, width):
    """Padded dict batch of per-document windows (see `val_windows`)."""
    b = len(windows)
    tokens = np.zeros((b, width), np.int32)
    seg = np.zeros((b, width), np.int32)
    pos = np.zeros((b, width), np.int32)
    for row, pieces in enumerate(windows):
        offset = 0
        for k, (start, n) in enumerate(pieces):
            tokens[row, offset:offset + n] = stream.read(start, start + n)
            seg[row, offset:offset + n] = k + 1
            pos[row, offset:offset + n] = np.arange(n)
            offset += n
    return {"tokens": tokens, "segment_ids": seg, "positions": pos, "loss_mask": loss_mask(seg)}
