"""Synthetic audio events: labelled clips for spectrogram-patch models, no download.

Clip `index` of a split is made by a NumPy generator seeded with (seed, split, index)
alone, so every process builds the same pool. Its label is `index % n_classes` (the
pool is balanced). The clip is a mixture of:
- the labelled event, at a random onset, lasting 25% to 80% of the clip, with an
  RMS level of -35 to -15 dBFS, raised-cosine fades, and per-clip jitter of its
  frequencies and rates;
- with probability 1/2, a distractor event of another class, 6 to 15 dB quieter;
- background noise over the whole clip, 0 to 20 dB below the event, with a random
  spectral tilt from white to pinker than pink.

Classes (frequencies for 16 kHz audio; scaled by sample_rate / 16000 otherwise):
  low_tone       steady 250-450 Hz tone with a weak second harmonic
  high_tone      steady 2.5-4 kHz tone
  rising_chirp   exponential sweep from 300-600 Hz up to 2-4 kHz
  falling_chirp  the same sweep downwards
  slow_clicks    click train at 3-6 clicks/s (short decaying noise bursts)
  fast_clicks    click train at 12-20 clicks/s
  low_noise      noise band from 150-300 Hz over about 1.3 octaves
  high_noise     noise band from 2.5-3.5 kHz over about 0.7 octaves
  am_tone        0.9-1.6 kHz tone amplitude-modulated at 6-12 Hz
  chord          two tones a fifth apart, the lower at 300-600 Hz (overlaps low_tone)
  harmonic       buzzy harmonic stack (voice-like), f0 100-220 Hz, 1/k amplitudes
  warble         1-2 kHz tone with 4-8 Hz vibrato of +-8% (overlaps am_tone's band)
Pairs that share a band (low_tone/chord, am_tone/warble, the click rates, the chirp
directions) make the task need more than the loudest mel bin.
"""
import numpy as np


SPLITS = {"train": 0, "val": 1}
CLASSES = ("low_tone", "high_tone", "rising_chirp", "falling_chirp", "slow_clicks",
           "fast_clicks", "low_noise", "high_noise", "am_tone", "chord", "harmonic",
           "warble")
EVENT_SECONDS = (0.25, 0.8)      # event length as a fraction of the clip
EVENT_DBFS = (-35.0, -15.0)      # RMS level of the labelled event
SNR_DB = (0.0, 20.0)             # event RMS over background-noise RMS
DISTRACTOR_DB = (6.0, 15.0)      # how much quieter the distractor is
DISTRACTOR_PROB = 0.5


def clip_rng(seed, split, index):
    return np.random.default_rng([int(seed) % 2**32, SPLITS[split], int(index), 0xA0D1])


def clip_label(index, n_classes):
    return int(index) % int(n_classes)


def _phase(rng, freq_N, sr):
    """Running phase (radians, random start) of an instantaneous frequency track [N]."""
    return 2 * np.pi * np.cumsum(freq_N) / sr + rng.uniform(0, 2 * np.pi)


def _sine(rng, freq_N, sr):
    return np.sin(_phase(rng, freq_N, sr))


def _clicks(rng, n, sr, rate):
    out = np.zeros(n)
    click = rng.standard_normal(int(0.006 * sr)) * np.exp(-np.arange(int(0.006 * sr)) /
                                                          (0.001 * sr))
    at = rng.uniform(0, sr / rate)
    while at < n:
        i = int(at)
        stop = min(i + len(click), n)
        out[i:stop] += click[:stop - i]
        at += sr / rate * rng.uniform(0.93, 1.07)
    return out


def _band_noise(rng, n, sr, lo, hi):
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    spec[(freqs < lo) | (freqs > hi)] = 0
    return np.fft.irfft(spec, n)


def _event(rng, kind, n, sr):
    """Waveform [n] of one event of class `kind` (name), before level and fades."""
    s = sr / 16000.0
    t = np.arange(n) / sr
    flat = np.ones(n)
    if kind in ("low_tone", "high_tone"):
        f = rng.uniform(250, 450) if kind == "low_tone" else rng.uniform(2500, 4000)
        phase = _phase(rng, f * s * flat, sr)
        return np.sin(phase) + (0.3 * np.sin(2 * phase) if kind == "low_tone" else 0)
    if kind in ("rising_chirp", "falling_chirp"):
        f0, f1 = rng.uniform(300, 600) * s, rng.uniform(2000, 4000) * s
        track = f0 * (f1 / f0) ** (t / t[-1] if n > 1 else 0)
        return _sine(rng, track if kind == "rising_chirp" else track[::-1], sr)
    if kind in ("slow_clicks", "fast_clicks"):
        rate = rng.uniform(3, 6) if kind == "slow_clicks" else rng.uniform(12, 20)
        return _clicks(rng, n, sr, rate)
    if kind == "low_noise":
        lo = rng.uniform(150, 300) * s
        return _band_noise(rng, n, sr, lo, lo * rng.uniform(2.2, 2.8))
    if kind == "high_noise":
        lo = rng.uniform(2500, 3500) * s
        return _band_noise(rng, n, sr, lo, lo * rng.uniform(1.5, 1.7))
    if kind == "am_tone":
        f, fm = rng.uniform(900, 1600) * s, rng.uniform(6, 12)
        return _sine(rng, f * flat, sr) * (0.55 + 0.45 * np.cos(2 * np.pi * fm * t))
    if kind == "chord":
        f = rng.uniform(300, 600) * s
        return _sine(rng, f * flat, sr) + _sine(rng, f * rng.uniform(1.47, 1.53) * flat, sr)
    if kind == "harmonic":
        f0 = rng.uniform(100, 220) * s
        ks = [k for k in range(1, 13) if k * f0 < 0.45 * sr]
        return sum(_sine(rng, k * f0 * flat, sr) / k for k in ks)
    if kind == "warble":
        fc, fv = rng.uniform(1000, 2000) * s, rng.uniform(4, 8)
        return _sine(rng, fc * (1 + 0.08 * np.sin(2 * np.pi * fv * t)), sr)
    raise ValueError(f"unknown event class {kind!r}")


def _placed(rng, cls, n, sr, rms):
    """Event of class index `cls` at a random onset/length in a clip of n samples."""
    n_ev = max(int(rng.uniform(*EVENT_SECONDS) * n), 2)
    onset = int(rng.integers(0, n - n_ev + 1))
    x = _event(rng, CLASSES[cls], n_ev, sr)
    x = x / (np.sqrt(np.mean(x ** 2)) + 1e-12) * rms
    fade = min(int(rng.uniform(0.005, 0.02) * sr), n_ev // 2)
    if fade > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
        x[:fade] *= ramp
        x[n_ev - fade:] *= ramp[::-1]
    out = np.zeros(n)
    out[onset:onset + n_ev] = x
    return out


def _background(rng, n, sr, rms):
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.maximum(np.fft.rfftfreq(n, 1 / sr), 20.0)
    spec *= freqs ** (-rng.uniform(0.0, 1.5) / 2)
    x = np.fft.irfft(spec, n)
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12) * rms


def make_clip(index, *, n_classes, n_samples, sample_rate, seed, split):
    """(float32 waveform [n_samples] in about [-1, 1], int label) of clip `index`."""
    rng = clip_rng(seed, split, index)
    label = clip_label(index, n_classes)
    rms = 10 ** (rng.uniform(*EVENT_DBFS) / 20)
    wave = _placed(rng, label, n_samples, sample_rate, rms)
    if n_classes > 1 and rng.uniform() < DISTRACTOR_PROB:
        other = int(rng.integers(n_classes - 1))
        other += other >= label
        quieter = 10 ** (-rng.uniform(*DISTRACTOR_DB) / 20)
        wave += _placed(rng, other, n_samples, sample_rate, rms * quieter)
    noise_rms = rms * 10 ** (-rng.uniform(*SNR_DB) / 20)
    wave += _background(rng, n_samples, sample_rate, noise_rms)
    return wave.astype(np.float32), label
