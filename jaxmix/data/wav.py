"""WAV files for the audio pipeline: header checks, PCM decoding (8/16/24/32-bit,
channels averaged), resampling to the pipeline's rate, and a deterministic train/val
split of a folder tree by a hash of each file's relative path."""
import glob
import hashlib
import math
import os
import wave

import numpy as np

from jaxmix.errors import ConfigError


def _wav_error(source, path, why):
    return ConfigError(f"data.source={source!r}: cannot read {path} as a PCM WAV ({why}); "
                       f"convert it (e.g. ffmpeg -i IN -c:a pcm_s16le OUT.wav) or leave it "
                       f"out of the glob")


def wav_header(path, source=""):
    """(channels, bytes per sample, rate, frames) of a PCM WAV; ConfigError otherwise."""
    try:
        with wave.open(path, "rb") as w:
            info = (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes())
    except (wave.Error, EOFError, OSError, ValueError) as e:
        raise _wav_error(source, path, e) from None
    if info[0] < 1 or info[1] not in (1, 2, 3, 4) or info[2] < 1:
        raise _wav_error(source, path, f"{info[0]} channels of {8 * info[1]} bits at "
                                       f"{info[2]} Hz")
    return info


def read_wav(path, sample_rate, max_samples=None, source=""):
    """Mono float32 waveform in [-1, 1] at `sample_rate` (channels averaged, mean
    removed as SSAST does), at most max_samples long."""
    n_ch, width, rate, n = wav_header(path, source)
    if max_samples is not None:
        n = min(n, math.ceil(max_samples * rate / sample_rate) + 64)
    try:
        with wave.open(path, "rb") as w:
            raw = w.readframes(n)
    except (wave.Error, EOFError, OSError, ValueError) as e:
        raise _wav_error(source, path, e) from None
    b = np.frombuffer(raw[:len(raw) // (n_ch * width) * n_ch * width], np.uint8)
    if width == 1:
        x = (b.astype(np.float32) - 128) / 128
    elif width == 3:
        b = b.reshape(-1, 3).astype(np.uint32)
        x = ((b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)).view(np.int32) / 2.0**31
    else:
        x = b.view("<i2" if width == 2 else "<i4") / 2.0**(8 * width - 1)
    x = x.reshape(-1, n_ch).mean(axis=1)
    if rate != sample_rate and len(x):
        from scipy.signal import resample_poly
        g = math.gcd(rate, sample_rate)
        x = resample_poly(x, sample_rate // g, rate // g)
    x = x[:max_samples] if max_samples is not None else x
    return (x - x.mean() if len(x) else x).astype(np.float32)


def glob_root(pattern):
    """The folder part of a glob before its first wildcard (split hashes are taken of
    paths relative to it, so they do not depend on where the data set is mounted)."""
    parts = pattern.split(os.sep)
    n = next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts) - 1)
    return os.sep.join(parts[:n]) or os.curdir


def split_files(relpaths, labels, val_fraction):
    """Bool [N], True = held out: a hash of each relative path against val_fraction; every
    class keeps a train file, and some class with 2+ files gives one to val if none."""
    h = np.array([int.from_bytes(hashlib.sha1(p.encode()).digest()[:8], "big") / 2.0**64
                  for p in relpaths])
    labels, is_val = np.asarray(labels), h < val_fraction
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if is_val[members].all():
            is_val[members[np.argmax(h[members])]] = False
    if not is_val.any():
        counts = np.bincount(labels)
        spare = np.flatnonzero(counts[labels] >= 2)
        if len(spare):
            is_val[spare[np.argmin(h[spare])]] = True
    return is_val
