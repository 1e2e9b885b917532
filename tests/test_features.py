"""Log-mel / MFCC maths, WAV reading and validation, batch computation, the feature cache,
and normalisation with training statistics."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch

from str_rnn import features as F
from str_rnn.datasets.audio import AudioError, FeatureDataset, read_wav
from str_rnn.features import (FeatureConfig, Standardize, cached_features, compute_features,
                              compute_many, feature_stats)

SR = 16000


def tone(seconds: float, freq: float = 440.0, sr: int = SR, seed: int = 0) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    noise = 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    return (0.5 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def write(path: Path, wave: np.ndarray, sr: int = SR, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, sr, subtype=subtype)
    return path


def bad_file(folder: Path, kind: str) -> Path:
    """A WAV file broken in the way ``kind`` says."""
    path = folder / f"{kind}.wav"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(b"this is not a RIFF file" * 20)
    elif kind == "truncated":
        write(path, tone(1.0))
        path.write_bytes(path.read_bytes()[:20000])
    elif kind == "stereo":
        write(path, np.stack([tone(0.5), tone(0.5, 880)], axis=1))
    elif kind == "no_samples":
        write(path, np.zeros(0, np.float32))
    return path


# ------------------------------------------------------------------------ the maths

def test_one_second_gives_99_by_32():
    config = FeatureConfig()
    x = compute_features(tone(1.0), SR, config)
    assert x.shape == (99, 32) and x.dtype == np.float32 and np.isfinite(x).all()
    assert config.num_frames(16000) == 99
    # MFCC keeps the frame count and has n_mfcc features
    assert compute_features(tone(1.0), SR, FeatureConfig(kind="mfcc", n_mfcc=20)).shape == (99, 20)


@pytest.mark.parametrize("center, frames", [(False, 99), (True, 101)])
def test_logmel_matches_librosa(center, frames):
    wave = tone(1.0, 1234.0)
    x = compute_features(wave, SR, FeatureConfig(center=center))
    # center=False: the last partial frame is zero-padded (python_speech_features' count)
    y = np.pad(wave, (0, 160)) if not center else wave
    mel = librosa.feature.melspectrogram(y=y, sr=SR, n_fft=400, hop_length=160, n_mels=32,
                                         center=center, pad_mode="constant")
    assert x.shape == (frames, 32)
    np.testing.assert_allclose(x, np.log(mel.T + 1e-6), atol=1e-4)


def test_mfcc_is_librosa_mfcc_up_to_db_scale():
    wave = tone(1.0, 700.0)
    x = compute_features(wave, SR, FeatureConfig(kind="mfcc", n_mfcc=13))
    mel = librosa.feature.melspectrogram(y=np.pad(wave, (0, 160)), sr=SR, n_fft=400,
                                         hop_length=160, n_mels=32, center=False)
    ref = librosa.feature.mfcc(S=10 * np.log10(mel + 1e-6), n_mfcc=13).T
    np.testing.assert_allclose(x * 10 / np.log(10), ref, atol=1e-3)


def test_resampling_8k_matches_16k():
    """A tone recorded at 8 kHz gives the 16 kHz features below 4 kHz, true length kept."""
    config = FeatureConfig(clip_seconds=None)
    at8 = compute_features(tone(0.6, 1000.0, sr=8000), 8000, config)
    at16 = compute_features(tone(0.6, 1000.0, sr=16000), SR, config)
    assert at8.shape == at16.shape == (config.num_frames(9600), 32)
    low = librosa.mel_frequencies(34, fmax=8000)[2:] < 3500  # band centres under 3.5 kHz
    peak = np.argmax(at16.mean(0))
    assert np.argmax(at8.mean(0)) == peak
    # the band holding the tone agrees to a few percent of its power (log diff < 0.1)
    assert abs(at8[:, peak].mean() - at16[:, peak].mean()) < 0.1
    assert np.corrcoef(at8[:, low].mean(0), at16[:, low].mean(0))[0, 1] > 0.99


def test_clip_length_pads_and_crops():
    config = FeatureConfig()  # 1 s clips
    short = compute_features(tone(0.3), SR, config)
    long = compute_features(tone(1.7), SR, config)
    assert short.shape == long.shape == (99, 32)
    # frames entirely in the zero padding sit at the log floor
    np.testing.assert_allclose(short[40:], np.log(1e-6), atol=1e-5)
    np.testing.assert_allclose(long, compute_features(tone(1.7)[:16000], SR, config), atol=1e-6)
    # true length: 0.3 s -> 1 + ceil((4800 - 400) / 160) = 29 frames
    assert compute_features(tone(0.3), SR, FeatureConfig(clip_seconds=None)).shape == (29, 32)


@pytest.mark.parametrize("field, value", [
    ("kind", "mel"), ("n_mels", 0), ("sample_rate", -1), ("clip_seconds", 0.0),
    ("fmax", 9000.0), ("log_offset", 0.0), ("hop_ms", 0.01),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        FeatureConfig(**{field: value})


def test_config_round_trip_and_options():
    config = FeatureConfig(kind="mfcc", n_mfcc=10, clip_seconds=None)
    assert FeatureConfig.from_dict(config.to_dict()) == config
    assert F.resolve_config(None, {"n_mels": 40}).n_mels == 40
    assert F.resolve_config(config, {}) is config
    with pytest.raises(ValueError, match="n_mel.*feature options are"):
        F.resolve_config(None, {"n_mel": 40})


# ------------------------------------------------------------------------ reading

def test_read_wav_pcm16_and_float(tmp_path):
    wave = tone(0.25)
    pcm = write(tmp_path / "pcm.wav", wave)
    flt = write(tmp_path / "float.wav", wave, subtype="FLOAT")
    x, sr = read_wav(pcm)
    assert sr == SR and x.dtype == np.float32
    np.testing.assert_array_equal(x, sf.read(pcm, dtype="float32")[0])  # fast path == libsndfile
    y, _ = read_wav(flt)  # soundfile fallback
    np.testing.assert_array_equal(y, wave)


@pytest.mark.parametrize("kind, message", [
    ("empty", "empty file"), ("corrupt", "not a readable audio file"),
    ("truncated", "truncated"), ("stereo", "2 channels, expected mono"),
    ("no_samples", "no samples"),
])
def test_read_wav_rejects_bad_files(tmp_path, kind, message):
    path = bad_file(tmp_path, kind)
    with pytest.raises(AudioError, match=message) as err:
        read_wav(path)
    assert str(path) in str(err.value)


def test_read_wav_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        read_wav(tmp_path / "nope.wav")


# ------------------------------------------------------------------------ many clips

@pytest.fixture
def clips(tmp_path) -> list[Path]:
    """Seven clips of different lengths and rates."""
    out = []
    for i, seconds in enumerate([0.2, 1.0, 0.5, 1.3, 0.05, 0.8, 0.4]):
        sr = 8000 if i % 3 == 0 else SR
        out.append(write(tmp_path / "wav" / f"c{i}.wav", tone(seconds, 300 + 100 * i, sr, i), sr))
    return out


@pytest.mark.parametrize("workers, chunk_size", [(1, 200), (2, 2), (3, 1)])
@pytest.mark.parametrize("clip_seconds", [None, 1.0])
def test_compute_many_equals_one_by_one(clips, workers, chunk_size, clip_seconds):
    config = FeatureConfig(clip_seconds=clip_seconds)
    bundle = compute_many(clips, config, workers=workers, chunk_size=chunk_size, progress=False)
    assert bundle.kept.tolist() == list(range(len(clips))) and bundle.skipped == []
    for k, path in enumerate(clips):
        one = compute_features(*read_wav(path), config)
        got = bundle.data[bundle.offsets[k]:bundle.offsets[k + 1]]
        np.testing.assert_allclose(got, one, atol=1e-5)


@pytest.mark.parametrize("kind", ["empty", "corrupt", "truncated", "stereo"])
def test_compute_many_skips_or_raises(clips, tmp_path, kind):
    bad = bad_file(tmp_path / "wav", kind)
    sources = clips[:3] + [bad, tmp_path / "wav" / "missing.wav"] + clips[3:]
    with pytest.warns(UserWarning, match=r"skipped 2 unusable audio file\(s\)") as record:
        bundle = compute_many(sources, FeatureConfig(), chunk_size=3, progress=False)
    message = str(record[0].message)
    assert f"{bad} (" in message and "missing.wav (no such audio file)" in message
    assert bundle.kept.tolist() == [0, 1, 2, 5, 6, 7, 8]
    assert len(bundle.offsets) == 8 and bundle.offsets[-1] == len(bundle.data) == 7 * 99
    with pytest.raises(AudioError, match=str(bad)):
        compute_many(sources, FeatureConfig(), strict=True, progress=False)


# ------------------------------------------------------------------------ cache

def test_cache_hit_skips_computation(clips, tmp_path, monkeypatch):
    config, cache = FeatureConfig(), tmp_path / "cache"
    first = cached_features(clips, config, dataset="t", split="train", cache_dir=cache,
                            progress=False)
    (bundle_file,) = cache.glob("*.npz")
    assert not list(cache.glob("*.tmp"))  # the atomic write left no temp file

    def boom(*args, **kwargs):
        raise AssertionError("recomputed although the cache should hit")

    monkeypatch.setattr(F, "compute_many", boom)
    second = cached_features(clips, config, dataset="t", split="train", cache_dir=cache,
                             progress=False)
    np.testing.assert_array_equal(second.data, first.data)
    np.testing.assert_array_equal(second.offsets, first.offsets)
    # another split and another config miss
    for kwargs in ({"split": "val", "config": config},
                   {"split": "train", "config": FeatureConfig(n_mels=40)}):
        with pytest.raises(AssertionError, match="recomputed"):
            cached_features(clips, kwargs["config"], dataset="t", split=kwargs["split"],
                            cache_dir=cache, progress=False)
    assert bundle_file.exists()


def test_cache_invalidated_by_changed_file(clips, tmp_path):
    config, cache = FeatureConfig(), tmp_path / "cache"
    before = cached_features(clips, config, dataset="t", split="train", cache_dir=cache,
                             progress=False)
    old_files = set(cache.glob("*.npz"))
    write(clips[1], tone(1.0, 3000.0))  # same size, new content and mtime
    os.utime(clips[1], ns=(1, 10**18))  # make sure the mtime differs even on coarse clocks
    after = cached_features(clips, config, dataset="t", split="train", cache_dir=cache,
                            progress=False)
    changed = slice(after.offsets[1], after.offsets[2])
    assert not np.allclose(after.data[changed], before.data[changed])
    np.testing.assert_array_equal(after.data[:after.offsets[1]], before.data[:before.offsets[1]])
    # one bundle per (dataset, split, config): the stale one is gone
    new_files = set(cache.glob("*.npz"))
    assert len(new_files) == 1 and new_files.isdisjoint(old_files)


def test_cache_records_skipped_files(clips, tmp_path):
    bad = bad_file(tmp_path / "wav", "corrupt")
    sources, cache = clips + [bad], tmp_path / "cache"
    with pytest.warns(UserWarning, match="skipped 1"):
        first = cached_features(sources, FeatureConfig(), dataset="t", split="train",
                                cache_dir=cache, progress=False)
    assert len(first.kept) == len(clips)
    with np.load(next(cache.glob("*.npz"))) as z:  # no frames stored for the bad file
        assert z["offsets"][-1] == len(z["data"]) == 99 * len(clips)
    with pytest.warns(UserWarning, match=f"skipped 1 .*{bad.name}"):  # warned again on a hit
        cached_features(sources, FeatureConfig(), dataset="t", split="train", cache_dir=cache,
                        progress=False)
    with pytest.raises(AudioError, match=bad.name):
        cached_features(sources, FeatureConfig(), dataset="t", split="train", cache_dir=cache,
                        strict=True, progress=False)


def test_corrupt_cache_file_is_rebuilt(clips, tmp_path):
    cache = tmp_path / "cache"
    ref = cached_features(clips, FeatureConfig(), dataset="t", split="a", cache_dir=cache,
                          progress=False)
    (path,) = cache.glob("*.npz")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="ignoring unreadable feature cache"):
        again = cached_features(clips, FeatureConfig(), dataset="t", split="a",
                                cache_dir=cache, progress=False)
    np.testing.assert_array_equal(again.data, ref.data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten: a clean hit now
        cached_features(clips, FeatureConfig(), dataset="t", split="a", cache_dir=cache,
                        progress=False)


# ------------------------------------------------------------------------ normalisation

def ragged_dataset(seed: int = 0) -> FeatureDataset:
    rng = np.random.default_rng(seed)
    lengths = [3, 7, 1, 5]
    data = rng.standard_normal((sum(lengths), 4)) * [1, 2, 3, 0] + [5, -1, 0, 2]
    data = data.astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return FeatureDataset(data, offsets, [0, 1, 0, 1], ["a", "b"], list("wxyz"))


def test_feature_stats_uses_true_frames_only():
    ds = ragged_dataset()
    mean, std = feature_stats(ds)
    np.testing.assert_allclose(mean.numpy(), ds.data.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std.numpy(), np.maximum(ds.data.std(0), 1e-5), rtol=1e-4)
    assert std[3] == pytest.approx(1e-5)  # constant feature: floored, not zero
    # the generic path (any dataset of items) agrees with the frame-store path
    items = [ds[i] for i in range(len(ds))]
    mean2, std2 = feature_stats(items)
    torch.testing.assert_close(mean2, mean)
    torch.testing.assert_close(std2, std, rtol=1e-4, atol=1e-6)
    # padded batches would drag the mean towards 0: stats ignore padding
    padded = torch.nn.utils.rnn.pad_sequence([x for x, _ in items], batch_first=True)
    assert not torch.allclose(padded.reshape(-1, 4).mean(0), mean)


def test_standardize_buffers_and_round_trip():
    ds = ragged_dataset()
    norm = Standardize.from_dataset(ds)
    assert {name for name, _ in norm.named_buffers()} == {"mean", "std"}
    assert not list(norm.parameters())
    out = norm(torch.from_numpy(ds.data))
    torch.testing.assert_close(out[:, :3].mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, :3].std(0, unbiased=False), torch.ones(3), atol=1e-4,
                               rtol=0)
    fresh = Standardize(4)
    fresh.load_state_dict(norm.state_dict())
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(fresh(x), (x - norm.mean) / norm.std)
    assert "num_features=4" in repr(fresh)
    with pytest.raises(ValueError, match="3 features"):
        fresh(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="std"):
        Standardize.from_stats(torch.zeros(4), torch.zeros(4))
