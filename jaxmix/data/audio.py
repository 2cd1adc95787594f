"""Audio clips as spectrogram patches for patch encoders (SSAST / SSAMBA style).

`data.source = "audio:synthetic"` (labelled synthetic events, see
`jaxmix.data.audio_synth`) or `"wav:GLOB"` (WAV files; the label is each file's
parent folder, classes sorted by name; a folder means FOLDER/**/*.wav). Settings are
`config.data.audio` (DEFAULTS below).

Front end (Kaldi fbank as torchaudio.compliance.kaldi.fbank computes it, without
dither): frames of `frame_len_ms` every `frame_shift_ms` (whole frames only), per-frame
DC removal, pre-emphasis 0.97, Hanning or Povey window, power spectrum over the next
power-of-two FFT, `n_mels` triangular filters on the HTK mel scale from 20 Hz to
Nyquist, log with a floor of float32 epsilon. The log-mel [frames, n_mels] is zero-padded
(as SSAST pads) or cropped to `clip_seconds * 1000 / frame_shift_ms` frames, normalised
as SSAST does, (x - norm_mean) / (2 * norm_std), and cut into non-overlapping
patch x patch squares: float32 [n_patches, patch * patch], patch k = (f, t) of the
(n_mels / patch) x (frames / patch) grid at k = f * time_patches + t (freq-major), each
patch flattened [mel, frame] row-major. Spare frames past a whole patch are dropped.

Batches are dicts {"patches": float32 [b, n_patches, patch_dim], "label": int32 [b],
and, with `mask_patches = N > 0`, "mask_idx": int32 [b, N]}: N distinct sorted patch
indices grown as clusters (SSAST's cluster masking). Global train batch `step` is made
from (train.seed, step) alone: clip position g = step * batch + row walks a permutation
of the train pool that is redrawn every epoch; each process makes only its own rows.
The pool is the first `label_fraction` of every class (a fixed shuffled order), or
every train clip when mask_patches > 0 (masked pretraining needs no labels). Patches of
a clip are computed on first use and kept in memory.
"""
import functools
import glob
import math
import os

import grain
import numpy as np

from jaxmix.data import audio_synth
from jaxmix.data.wav import glob_root, read_wav, split_files, wav_header
from jaxmix.data.step_pipeline import StepPipeline
from jaxmix.errors import ConfigError

# config.data.audio, as a config file starts it.
DEFAULTS = dict(sample_rate=16000, clip_seconds=1.28, n_mels=128, frame_shift_ms=10.0,
                frame_len_ms=25.0, window="hanning", patch=16, norm_mean=-4.2677,
                norm_std=4.5690, n_classes=10, n_clips=2000, val_clips=200,
                label_fraction=1.0, mask_patches=0)
WINDOWS = ("hanning", "povey")
LOG_FLOOR = float(np.finfo(np.float32).eps)
PREEMPHASIS = 0.97
LOW_HZ = 20.0
VAL_FRACTION = 0.1   # wav: default share of held-out files (data.val_fraction)


# ----------------------------------------------------------------------------- settings

def audio_settings(audio_cfg=None):
    """DEFAULTS overridden by a mapping (config.data.audio); a plain dict."""
    given = {} if audio_cfg is None else dict(audio_cfg.items())
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"data.audio.{unknown[0]}: unknown setting; known: "
                          f"{', '.join(DEFAULTS)}")
    return {**DEFAULTS, **given}


def frame_sizes(s):
    """(frame length, frame shift) in samples."""
    sr = s["sample_rate"]
    return (int(round(sr * s["frame_len_ms"] / 1000)),
            int(round(sr * s["frame_shift_ms"] / 1000)))


def n_frames(audio_cfg):
    s = audio_settings(audio_cfg)
    return int(round(s["clip_seconds"] * 1000 / s["frame_shift_ms"]))


def n_samples(audio_cfg):
    """Samples that give exactly n_frames whole frames."""
    win, shift = frame_sizes(audio_settings(audio_cfg))
    return (n_frames(audio_cfg) - 1) * shift + win


def grid(audio_cfg):
    """(freq_patches, time_patches) of a clip."""
    s = audio_settings(audio_cfg)
    return s["n_mels"] // s["patch"], n_frames(s) // s["patch"]


def n_patches(audio_cfg):
    f, t = grid(audio_cfg)
    return f * t


def check_settings(s):
    """One-line ConfigError for data.audio values the front end cannot use."""
    win, shift = frame_sizes(s)
    if s["sample_rate"] < 1000 or win < 2 or shift < 1:
        raise ConfigError(f"data.audio: sample_rate={s['sample_rate']}, frame_len_ms="
                          f"{s['frame_len_ms']}, frame_shift_ms={s['frame_shift_ms']} give "
                          f"frames of {win} samples every {shift}; raise them")
    if s["window"] not in WINDOWS:
        raise ConfigError(f"data.audio.window={s['window']!r}: use one of {WINDOWS}")
    patch, mels = s["patch"], s["n_mels"]
    if patch < 1 or mels < patch or mels % patch:
        raise ConfigError(f"data.audio.n_mels={mels} must be a positive multiple of "
                          f"data.audio.patch={patch}")
    if n_frames(s) < patch:
        raise ConfigError(f"data.audio.clip_seconds={s['clip_seconds']} gives "
                          f"{n_frames(s)} frames, fewer than one patch of {patch}; "
                          f"raise it")
    if not 0 < s["label_fraction"] <= 1:
        raise ConfigError(f"data.audio.label_fraction={s['label_fraction']} must lie "
                          f"in (0, 1]")
    n_mask, total = s["mask_patches"], n_patches(s)
    if n_mask < 0:
        raise ConfigError(f"data.audio.mask_patches={n_mask} must be >= 0 (0: no masking)")
    if n_mask > total:
        raise ConfigError(f"data.audio.mask_patches={n_mask} is larger than the {total} "
                          f"patches per clip; use 0 (no masking) to {total}")


# ----------------------------------------------------------------------------- front end

def hz_to_mel(hz):
    return 1127.0 * np.log(1.0 + np.asarray(hz, np.float64) / 700.0)


@functools.lru_cache(maxsize=8)
def mel_filters(n_mels, n_fft, sample_rate, low_hz=LOW_HZ):
    """[n_fft // 2 + 1, n_mels] triangular weights, triangles on the mel axis (Kaldi)."""
    mel_lo, mel_hi = hz_to_mel(low_hz), hz_to_mel(sample_rate / 2)
    delta = (mel_hi - mel_lo) / (n_mels + 1)
    left_M = mel_lo + np.arange(n_mels) * delta
    mel_K = hz_to_mel(sample_rate / n_fft * np.arange(n_fft // 2))[:, None]
    up_KM, down_KM = (mel_K - left_M) / delta, (left_M + 2 * delta - mel_K) / delta
    weights_KM = np.maximum(0.0, np.minimum(up_KM, down_KM))
    weights_KM = np.concatenate([weights_KM, np.zeros((1, n_mels))])  # Nyquist: weight 0
    weights_KM.flags.writeable = False
    return weights_KM


def fbank(wave_N, s):
    """Log-mel filterbank float32 [frames, n_mels] of a mono waveform (Kaldi fbank)."""
    win, shift = frame_sizes(s)
    x = np.asarray(wave_N, np.float64)
    if len(x) < win:
        return np.zeros((0, s["n_mels"]), np.float32)
    frames_TW = np.lib.stride_tricks.sliding_window_view(x, win)[::shift]
    frames_TW = frames_TW - frames_TW.mean(axis=1, keepdims=True)
    previous_TW = np.concatenate([frames_TW[:, :1], frames_TW[:, :-1]], axis=1)
    frames_TW = frames_TW - PREEMPHASIS * previous_TW
    window_W = np.hanning(win) ** (0.85 if s["window"] == "povey" else 1.0)
    n_fft = 1 << (win - 1).bit_length()
    power_TK = np.abs(np.fft.rfft(frames_TW * window_W, n_fft)) ** 2
    mel_TM = power_TK @ mel_filters(s["n_mels"], n_fft, s["sample_rate"])
    return np.log(np.maximum(mel_TM, LOG_FLOOR)).astype(np.float32)


def to_patches(spec_TF, patch):
    """[T, F] -> [(F // patch) * (T // patch), patch * patch], freq-major grid order."""
    n_t, n_f = spec_TF.shape[0] // patch, spec_TF.shape[1] // patch
    spec_FT = spec_TF[:n_t * patch, :n_f * patch].T
    return (spec_FT.reshape(n_f, patch, n_t, patch).transpose(0, 2, 1, 3)
            .reshape(n_f * n_t, patch * patch))


def clip_patches(wave_N, s):
    """Normalised patches float32 [n_patches, patch * patch] of one clip."""
    spec_TF = fbank(wave_N, s)[:n_frames(s)]
    spec_TF = np.pad(spec_TF, ((0, n_frames(s) - len(spec_TF)), (0, 0)))
    spec_TF = (spec_TF - s["norm_mean"]) / (2 * s["norm_std"])
    return np.ascontiguousarray(to_patches(spec_TF, s["patch"]), np.float32)


# ----------------------------------------------------------------------------- masking

def cluster_mask(rng, grid_ft, n_mask):
    """int32 [n_mask] distinct sorted patch indices: clusters grown around random free
    patches, each its c x c neighbourhood (c in 3..5, clipped at the grid edges) taken
    nearest-first, until n_mask are chosen (the last cluster cut short)."""
    n_f, n_t = grid_ft
    chosen_FT = np.zeros((n_f, n_t), bool)
    picked = []
    while len(picked) < n_mask:
        free = np.flatnonzero(~chosen_FT.ravel())
        f0, t0 = divmod(int(free[rng.integers(len(free))]), n_t)
        c = int(rng.integers(3, 6))
        lo_f, lo_t = max(f0 - (c - 1) // 2, 0), max(t0 - (c - 1) // 2, 0)
        hi_f, hi_t = min(f0 - (c - 1) // 2 + c, n_f), min(t0 - (c - 1) // 2 + c, n_t)
        ff, tt = np.meshgrid(np.arange(lo_f, hi_f), np.arange(lo_t, hi_t), indexing="ij")
        ff, tt = ff.ravel(), tt.ravel()
        near = np.lexsort((np.abs(ff - f0) + np.abs(tt - t0),
                           np.maximum(np.abs(ff - f0), np.abs(tt - t0))))
        for f, t in zip(ff[near], tt[near]):
            if len(picked) < n_mask and not chosen_FT[f, t]:
                chosen_FT[f, t] = True
                picked.append(f * n_t + t)
    return np.sort(np.asarray(picked, np.int32))


def mask_rng(seed, split, step, row):
    return np.random.default_rng([int(seed) % 2**32, audio_synth.SPLITS[split], int(step),
                                  int(row), 0x3A5C])


# ----------------------------------------------------------------------------- WAV files

class Clips:
    """One split's clips: int32 labels [N]; patches made on first use, then kept."""

    def __init__(self, labels, make_patches):
        self.labels_N = np.asarray(labels, np.int32)
        self._make, self._cache = make_patches, {}

    def __len__(self):
        return len(self.labels_N)

    def patches(self, i):
        i = int(i)
        p = self._cache.get(i)
        if p is None:
            p = self._make(i)
            p.flags.writeable = False
            self._cache[i] = p
        return p


def synthetic_clips(s, seed):
    """(train Clips, val Clips, class names) of `audio:synthetic` for data.audio
    settings `s` (n_clips train clips, val_clips held out); patches are made on first
    use."""
    n_cls = s["n_classes"]
    if not 2 <= n_cls <= len(audio_synth.CLASSES):
        raise ConfigError(f"data.audio.n_classes={n_cls}: audio:synthetic has 2 to "
                          f"{len(audio_synth.CLASSES)} classes")
    if s["n_clips"] < 1 or s["val_clips"] < 0:
        raise ConfigError(f"data.audio.n_clips={s['n_clips']} must be positive and "
                          f"val_clips={s['val_clips']} >= 0")

    def split_clips(split, n):
        def make(i):
            wave_N, _ = audio_synth.make_clip(i, n_classes=n_cls, n_samples=n_samples(s),
                                              sample_rate=s["sample_rate"], seed=seed,
                                              split=split)
            return clip_patches(wave_N, s)
        return Clips([audio_synth.clip_label(i, n_cls) for i in range(n)], make)

    names = list(audio_synth.CLASSES[:n_cls])
    return split_clips("train", s["n_clips"]), split_clips("val", s["val_clips"]), names


def wav_clips(source, s, val_fraction):
    """(train Clips, val Clips, class names) of `wav:GLOB`; headers checked up front."""
    pattern = os.path.expanduser(source[len("wav:"):])
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*.wav")
    paths = sorted(p for p in glob.glob(pattern, recursive=True)
                   if p.lower().endswith(".wav") and os.path.isfile(p))
    if not paths:
        raise ConfigError(f"data.source={source!r}: no .wav files match {pattern!r}; use "
                          f"wav:GLOB over WAV files in class folders, e.g. "
                          f"wav:/data/speech_commands/*/*.wav")
    folder = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    names = sorted(set(folder))
    if len(names) < 2:
        raise ConfigError(f"data.source={source!r}: the {len(paths)} .wav files are all in "
                          f"one folder ({names[0]!r}); the label is each file's parent "
                          f"folder, so arrange them into 2 or more class folders")
    for p in paths:
        wav_header(p, source)
    labels = np.array([names.index(f) for f in folder])
    root = glob_root(pattern)
    is_val = split_files([os.path.relpath(p, root) for p in paths], labels, val_fraction)

    def split_clips(pick):
        chosen = [paths[i] for i in np.flatnonzero(pick)]
        return Clips(labels[pick], lambda i: clip_patches(
            read_wav(chosen[i], s["sample_rate"], n_samples(s), source), s))
    return split_clips(~is_val), split_clips(is_val), names


def labelled_subset(labels_N, fraction, seed):
    """Sorted clip indices: the first ceil(fraction * n) of each class's n clips in a
    fixed shuffled order (seeded by train.seed)."""
    order = np.random.default_rng([int(seed) % 2**32, 0x1AB]).permutation(len(labels_N))
    keep = []
    for c in np.unique(labels_N):
        members = order[labels_N[order] == c]
        keep.extend(members[:math.ceil(fraction * len(members) - 1e-9)])
    return np.sort(np.asarray(keep, np.int64))


# ----------------------------------------------------------------------------- pipeline

class AudioPipeline(StepPipeline):
    """Spectrogram-patch batches of audio clips; the interface of `Pipeline`.

    Attributes: train_iter, local_batch, global_batch, seq_len (= n_patches), grid,
    patch_dim, n_mask, n_classes, class_names, train, val (Clips), pool (train clip
    indices the iterator draws from), settings (data.audio with DEFAULTS filled in).
    """
    is_text = False
    STEPS = 2**62  # "infinite": batches are made on demand from (seed, step)

    def __init__(self, config, process_index=0, process_count=1):
        s = self.settings = audio_settings(config.data.get("audio"))
        check_settings(s)
        self.source = config.data.source
        self.grid, self.seq_len = grid(s), n_patches(s)
        if config.train.seq_len != self.seq_len:
            raise ConfigError(f"train.seq_len={config.train.seq_len}: audio clips have "
                              f"{self.seq_len} patches ({self.grid[0]} x {self.grid[1]}); "
                              f"set train.seq_len={self.seq_len}")
        self.patch_dim, self.n_mask = s["patch"] ** 2, int(s["mask_patches"])
        self.set_rows(config, process_index, process_count)
        self.rows = np.asarray(self.rows)
        if self.source == "audio:synthetic":
            self.train, self.val, self.class_names = synthetic_clips(s, self.seed)
        elif isinstance(self.source, str) and self.source.startswith("wav:"):
            val_fraction = float(config.data.get("val_fraction", VAL_FRACTION))
            if not 0 <= val_fraction < 1:
                raise ConfigError(f"data.val_fraction={val_fraction} must lie in [0, 1)")
            self.train, self.val, self.class_names = wav_clips(self.source, s, val_fraction)
        else:
            raise ConfigError(f"data.source={self.source!r}: audio sources are "
                              f"'audio:synthetic' and 'wav:GLOB'")
        self.n_classes = len(self.class_names)
        if self.eval_batches and not len(self.val):
            raise ConfigError(f"data.source={self.source!r} has no held-out clips; raise "
                              f"data.audio.val_clips / data.val_fraction or set "
                              f"train.eval_batches=0")
        self.pool = (np.arange(len(self.train)) if self.n_mask else
                     labelled_subset(self.train.labels_N, s["label_fraction"], self.seed))
        self._val_cache = None
        # Recent epochs' orders (lru_cache is safe to share with the prefetch thread).
        self._epoch_order = functools.lru_cache(maxsize=4)(self._new_epoch_order)
        self.train_dataset = grain.MapDataset.range(self.STEPS).map(self._train_batch)
        self.train_iter = self.new_train_iter()

    def _new_epoch_order(self, epoch):
        """The pool's clip indices in the order epoch `epoch` visits them."""
        rng = np.random.default_rng([self.seed % 2**32, 0x5E9, int(epoch)])
        return self.pool[rng.permutation(len(self.pool))]

    def _batch(self, clips, idx_b, split, step):
        batch = {"patches": np.stack([clips.patches(i) for i in idx_b]),
                 "label": clips.labels_N[idx_b].astype(np.int32)}
        if self.n_mask:
            batch["mask_idx"] = np.stack([
                cluster_mask(mask_rng(self.seed, split, step, r), self.grid, self.n_mask)
                for r in self.rows])
        return batch

    def _train_batch(self, step):
        """This process's rows of global train batch `step`."""
        position_b = int(step) * self.global_batch + self.rows
        epoch_b, pos_b = np.divmod(position_b, len(self.pool))
        idx_b = np.array([self._epoch_order(int(e))[p] for e, p in zip(epoch_b, pos_b)])
        return self._batch(self.train, idx_b, "train", int(step))

    def val_batches(self):
        """`eval_batches` fixed batches of held-out clips (cycled when too few)."""
        if self._val_cache is None:
            self._val_cache = [
                self._batch(self.val, (k * self.global_batch + self.rows) % len(self.val),
                            "val", k) for k in range(self.eval_batches)]
        return list(self._val_cache)

    def describe(self):
        s, (n_f, n_t) = self.settings, self.grid
        used = ("all used: masked pretraining" if self.n_mask else
                f"{len(self.pool)} labelled, label_fraction {s['label_fraction']}")
        mask = f"; {self.n_mask} masked patches per clip" if self.n_mask else ""
        return (f"{self.source}: {self.n_classes} classes; train {len(self.train)} "
                f"clips ({used}) / val {len(self.val)} clips; {s['clip_seconds']} s at "
                f"{s['sample_rate']} Hz -> {n_frames(s)} frames x {s['n_mels']} mels -> "
                f"{n_f} x {n_t} = {self.seq_len} patches of {s['patch']}x{s['patch']}"
                f"{mask}; batch {self.global_batch} = {self.process_count} x "
                f"{self.local_batch}")
