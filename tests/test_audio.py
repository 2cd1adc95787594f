"""Tests for jaxmix.data.audio: Kaldi-style fbank, patches, synthetic events, WAV folders,
cluster masks, and the audio pipeline (tiny clips: 0.64 s, 32 mels)."""
import wave

import ml_collections
import numpy as np
import pytest

from jaxmix import data
from jaxmix.data import audio, audio_synth
from jaxmix.errors import ConfigError

SR = 16000
TINY = dict(clip_seconds=0.64, n_mels=32, patch=16, n_classes=4, n_clips=24, val_clips=6)
# 0.64 s = 64 frames; 32 mels -> grid 2 x 4 = 8 patches of 16 x 16.


def make_config(source="audio:synthetic", *, audio_cfg=None, **train):
    c = ml_collections.ConfigDict()
    c.train = ml_collections.ConfigDict(dict(batch_size=4, seq_len=8, eval_batches=2,
                                             seed=0))
    c.train.update(train)
    c.data = ml_collections.ConfigDict(dict(source=source, val_fraction=0.3))
    c.data.audio = ml_collections.ConfigDict({**TINY, **(audio_cfg or {})})
    return c


def tone(freq, seconds, sr, amp=0.5):
    return amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)


def write_wav(path, x_NC, sr, width):
    """PCM WAV of float samples [N] or [N, channels] in [-1, 1], `width` bytes each."""
    x_NC = np.asarray(x_NC).reshape(len(x_NC), -1)
    scale = 2 ** (8 * width - 1) - 1
    q = np.round(x_NC * scale).astype(np.int64)
    if width == 1:
        raw = (q + 128).astype(np.uint8).tobytes()
    elif width == 3:
        raw = (q.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]).tobytes()
    else:
        raw = q.astype("<i2" if width == 2 else "<i4").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x_NC.shape[1])
        w.setsampwidth(width)
        w.setframerate(sr)
        w.writeframes(raw)


def peak_hz(x, sr):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / sr)[spectrum.argmax()]


def mel_bin_of(freq, n_mels=32):
    """The mel filter whose centre lies nearest to `freq` (Hz), at 16 kHz."""
    mel_lo = audio.hz_to_mel(audio.LOW_HZ)
    delta = (audio.hz_to_mel(SR / 2) - mel_lo) / (n_mels + 1)
    centres_M = mel_lo + delta * np.arange(1, n_mels + 1)
    return np.abs(centres_M - audio.hz_to_mel(freq)).argmin()


def one_line_error(fn, *needles):
    with pytest.raises(ConfigError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# ----------------------------------------------------------------------------- front end

@pytest.mark.parametrize("window", ["hanning", "povey"])
def test_fbank_tone_peaks_in_its_mel_bin(window):
    s = audio.audio_settings(dict(n_mels=32, window=window))
    for freq in (150, 440, 1000, 2500, 6000):
        fbank_TM = audio.fbank(tone(freq, 0.3, SR), s)
        assert fbank_TM.shape == (1 + (int(0.3 * SR) - 400) // 160, 32)
        assert fbank_TM.dtype == np.float32
        assert fbank_TM.mean(0).argmax() == mel_bin_of(freq), freq
    silent = audio.fbank(np.zeros(800), s)
    np.testing.assert_allclose(silent, np.log(audio.LOG_FLOOR))


def test_patch_order_is_freq_major():
    n_t, n_f, p = 6, 4, 2
    spec_TF = 100.0 * np.arange(n_t)[:, None] + np.arange(n_f)[None, :]
    patches_PD = audio.to_patches(np.pad(spec_TF, ((0, 1), (0, 0))), p)  # 7th frame: spare
    assert patches_PD.shape == (2 * 3, p * p)
    for k in range(6):
        fi, ti = divmod(k, 3)
        for df in range(p):
            for dt in range(p):
                assert patches_PD[k, df * p + dt] == spec_TF[ti * p + dt, fi * p + df]
    s = audio.audio_settings(TINY)
    assert audio.grid(s) == (2, 4) and audio.n_patches(s) == 8
    assert audio.grid(None) == (8, 8) and audio.n_patches({}) == 64   # DEFAULTS
    x = audio.clip_patches(tone(1000, 0.3, SR), s)   # short: padded to 64 frames
    assert x.shape == (8, 256) and x.dtype == np.float32
    pad = (0 - s["norm_mean"]) / (2 * s["norm_std"])
    np.testing.assert_allclose(x[3].reshape(16, 16)[:, -1], pad, rtol=1e-6)


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_deterministic_and_classes_differ():
    n = audio.n_samples(TINY)
    clip = dict(n_classes=12, n_samples=n, sample_rate=SR)
    a, la = audio_synth.make_clip(5, seed=0, split="train", **clip)
    b, _ = audio_synth.make_clip(5, seed=0, split="train", **clip)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (n,) and a.dtype == np.float32 and la == 5
    assert not np.array_equal(a, audio_synth.make_clip(5, seed=1, split="train", **clip)[0])
    assert not np.array_equal(a, audio_synth.make_clip(5, seed=0, split="val", **clip)[0])
    # the classes differ: a nearest-centroid classifier on each clip's per-mel-bin peak
    # over its median beats chance (1/12) on held-out clips, without solving the task
    s = audio.audio_settings(TINY)

    def features(split, count):
        made = [audio_synth.make_clip(i, seed=0, split=split, **clip) for i in range(count)]
        fbanks = [audio.fbank(wave_N, s) for wave_N, _ in made]
        return (np.stack([f.max(0) - np.median(f, 0) for f in fbanks]),
                np.array([label for _, label in made]))
    x_train, y_train = features("train", 96)
    x_val, y_val = features("val", 48)
    centroids = np.stack([x_train[y_train == c].mean(0) for c in range(12)])
    guess = ((x_val[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert 0.2 < (guess == y_val).mean() < 0.9


def test_synthetic_pipeline_batches():
    p = data.build(make_config())
    assert p.seq_len == 8 and p.patch_dim == 256 and p.n_classes == 4 and not p.is_text
    assert p.class_names == list(audio_synth.CLASSES[:4])
    b = next(p.train_iter)
    assert set(b) == {"patches", "label"}
    assert b["patches"].shape == (4, 8, 256) and b["patches"].dtype == np.float32
    assert b["label"].dtype == np.int32 and 0 <= b["label"].min() <= b["label"].max() < 4
    q = data.build(make_config())
    np.testing.assert_array_equal(next(q.train_iter)["patches"], b["patches"])
    other = next(data.build(make_config(seed=1)).train_iter)
    assert not np.array_equal(other["patches"], b["patches"])
    v = p.val_batches()
    assert len(v) == 2 and v[0]["patches"].shape == (4, 8, 256)
    np.testing.assert_array_equal(v[1]["label"], np.array([4, 5, 0, 1]) % 4)  # 6 cycled
    line = p.describe()
    assert "\n" not in line and "8 patches" in line and "24 clips" in line


def test_resume_and_process_rows():
    p = data.build(make_config())
    batches = [next(p.train_iter) for _ in range(8)]   # 32 rows: past one epoch of 24
    for k in (3, 7):
        got = next(p.seek(k))
        for key in batches[k]:
            np.testing.assert_array_equal(got[key], batches[k][key])
    halves = [data.build(make_config(), process_index=i, process_count=2) for i in (0, 1)]
    for k in (0, 6):
        parts = [next(h.seek(k)) for h in halves]
        for key in ("patches", "label"):
            np.testing.assert_array_equal(np.concatenate([x[key] for x in parts]),
                                          batches[k][key])
    # every clip once per epoch
    labels_epoch = np.concatenate([b["label"] for b in batches[:6]])
    assert np.bincount(labels_epoch).tolist() == [6, 6, 6, 6]


def test_label_fraction_and_masked_pool():
    p = data.build(make_config(audio_cfg=dict(label_fraction=0.25)))
    assert len(p.pool) == 8 and np.bincount(p.train.labels_N[p.pool]).tolist() == [2] * 4
    seen = {x.tobytes() for _ in range(6) for x in next(p.train_iter)["patches"]}
    assert len(seen) == 8   # 24 draws, all from the 8 labelled clips
    m = data.build(make_config(audio_cfg=dict(label_fraction=0.25, mask_patches=3)))
    assert len(m.pool) == 24


# ----------------------------------------------------------------------------- masking

def test_cluster_mask_distinct_clustered():
    grid = (8, 16)
    for seed in range(5):
        idx = audio.cluster_mask(np.random.default_rng(seed), grid, 40)
        assert idx.dtype == np.int32 and idx.shape == (40,)
        assert len(set(idx.tolist())) == 40 and 0 <= idx.min() and idx.max() < 128
        on = np.zeros(grid, bool)
        on.flat[idx] = True
        padded = np.pad(on, 1)
        neighbours = sum(np.roll(np.roll(padded, df, 0), dt, 1)
                         for df in (-1, 0, 1) for dt in (-1, 0, 1) if df or dt)[1:-1, 1:-1]
        assert (on & (neighbours == 0)).sum() <= 1   # only a cut-short last cluster
    full = audio.cluster_mask(np.random.default_rng(0), (2, 4), 8)
    assert full.tolist() == list(range(8))


def test_pipeline_mask_idx():
    cfg = make_config(audio_cfg=dict(patch=8, mask_patches=10), seq_len=32)
    p, q = data.build(cfg), data.build(cfg)
    b = next(p.train_iter)
    assert b["mask_idx"].shape == (4, 10) and b["mask_idx"].dtype == np.int32
    np.testing.assert_array_equal(b["mask_idx"], next(q.train_iter)["mask_idx"])
    assert len({tuple(r) for r in b["mask_idx"].tolist()}) == 4
    assert all(len(set(r)) == 10 for r in b["mask_idx"].tolist())
    assert b["mask_idx"].max() < 32 and p.val_batches()[0]["mask_idx"].shape == (4, 10)


# ----------------------------------------------------------------------------- WAV files

def write_class_folders(root):
    """cat: mono 16-bit 8 kHz 1 kHz tones; dog: stereo 16-bit 22.05 kHz 3 kHz; bird:
    24-bit 16 kHz and 8-bit 11.025 kHz 500 Hz tones; three files each."""
    for i in range(3):
        write_wav(root / "cat" / f"c{i}.wav", tone(1000, 0.5, 8000), 8000, 2)
        stereo = np.stack([tone(3000, 0.7, 22050), tone(3000, 0.7, 22050)], 1)
        write_wav(root / "dog" / f"d{i}.wav", stereo, 22050, 2)
        write_wav(root / "bird" / f"b{i}.wav", tone(500, 0.6, 16000), 16000, 3)
    write_wav(root / "bird" / "b8bit.wav", tone(500, 0.6, 11025), 11025, 1)


def test_read_wav_formats_and_resampling(tmp_path):
    write_class_folders(tmp_path)
    for name, freq, seconds in (("cat/c0", 1000, 0.5), ("dog/d0", 3000, 0.7),
                                ("bird/b0", 500, 0.6), ("bird/b8bit", 500, 0.6)):
        x = audio.read_wav(str(tmp_path / f"{name}.wav"), SR)
        assert x.dtype == np.float32 and abs(len(x) - seconds * SR) <= 2, name
        assert abs(peak_hz(x, SR) - freq) < 5, name
        assert abs(np.abs(x).max() - 0.5) < 0.02, name
    x = audio.read_wav(str(tmp_path / "bird/b0.wav"), SR)
    np.testing.assert_allclose(x, tone(500, 0.6, SR) - tone(500, 0.6, SR).mean(), atol=1e-6)
    assert len(audio.read_wav(str(tmp_path / "dog/d0.wav"), SR, max_samples=1000)) == 1000


def test_wav_pipeline_labels_from_folders(tmp_path):
    write_class_folders(tmp_path / "clips")
    for source in (f"wav:{tmp_path}/clips/**/*.wav", f"wav:{tmp_path}/clips"):
        p = data.build(make_config(source))
        assert p.class_names == ["bird", "cat", "dog"] and p.n_classes == 3
        labels = np.concatenate([p.train.labels_N, p.val.labels_N])
        assert np.bincount(labels).tolist() == [4, 3, 3]
        assert len(p.val) >= 1 and set(p.train.labels_N.tolist()) == {0, 1, 2}
        b = next(p.train_iter)
        assert b["patches"].shape == (4, 8, 256) and b["label"].dtype == np.int32
    # each clip's tone sits in the mel bin of its class's frequency
    freqs = {"bird": 500, "cat": 1000, "dog": 3000}
    for i in range(len(p.train)):
        patches = p.train.patches(i).reshape(2, 4, 16, 16)            # [f, t, mel, frame]
        spec_FT = patches.transpose(0, 2, 1, 3).reshape(32, 64)
        freq = freqs[p.class_names[p.train.labels_N[i]]]
        assert spec_FT[:, :20].mean(1).argmax() == mel_bin_of(freq)   # first 0.2 s: sound


def test_wav_split_keeps_a_train_clip_per_class():
    labels = [0, 0, 1, 1, 1]
    is_val = audio.split_files([f"f{i}.wav" for i in range(5)], labels, 0.99)
    assert not is_val[:2].all() and not is_val[2:].all()
    is_val = audio.split_files([f"f{i}.wav" for i in range(5)], labels, 0.0)
    assert is_val.sum() == 1


# ----------------------------------------------------------------------------- errors

def test_config_errors(tmp_path):
    one_line_error(lambda: data.build(make_config(f"wav:{tmp_path}/none/*.wav")),
                   "data.source", "no .wav files")
    write_wav(tmp_path / "only" / "a.wav", tone(440, 0.2, SR), SR, 2)
    write_wav(tmp_path / "only" / "b.wav", tone(440, 0.2, SR), SR, 2)
    one_line_error(lambda: data.build(make_config(f"wav:{tmp_path}/only/*.wav")),
                   "data.source", "'only'", "2 or more class folders")
    write_wav(tmp_path / "two" / "x" / "a.wav", tone(440, 0.2, SR), SR, 2)
    bad = tmp_path / "two" / "y" / "float.wav"
    write_wav(bad, tone(440, 0.2, SR), SR, 2)
    raw = bytearray(bad.read_bytes())
    raw[20:22] = (3).to_bytes(2, "little")      # WAVE_FORMAT_IEEE_FLOAT
    bad.write_bytes(bytes(raw))
    one_line_error(lambda: data.build(make_config(f"wav:{tmp_path}/two/*/*.wav")),
                   "data.source", str(bad), "pcm_s16le")
    one_line_error(lambda: data.build(make_config(audio_cfg=dict(mask_patches=9))),
                   "data.audio.mask_patches=9 is larger than the 8 patches per clip")
    one_line_error(lambda: data.build(make_config(seq_len=64)),
                   "train.seq_len=64", "set train.seq_len=8")
    one_line_error(lambda: data.build(make_config(audio_cfg=dict(n_mels=40))),
                   "data.audio.n_mels=40")
    one_line_error(lambda: audio.audio_settings(dict(n_mel=32)), "data.audio.n_mel")
