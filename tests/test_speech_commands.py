"""Speech Commands loader on a tiny corpus written by the tests: official list files and
the hashing rule, the kws12 recipe (silence / unknown = 10% of keywords), kws35,
determinism, bad inputs, caching and augmentation."""
from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from str_rnn import features as F
from str_rnn.datasets import load, speech_commands as sc
from str_rnn.datasets.audio import AudioError, FeatureDataset
from str_rnn.datasets.speech_commands import (KEYWORDS, KWS12_CLASSES, load_speech_commands,
                                              split_files, which_set)

SR = 16000
OTHERS = ("cat", "dog")
# Speaker ids chosen so Google's hash rule puts them where the list files do too
# (see test_which_set_known_values): spk5 -> val, spk30 -> test, the rest -> train.
TRAIN, VAL, TEST = ("spk0", "spk2", "spk4", "spk6"), ("spk5",), ("spk30",)


def clip(seed: int, seconds: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * SR)) / SR
    return (0.4 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t)
            + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def make_corpus(root: Path, lists: bool = True) -> Path:
    files = []
    for w, word in enumerate(KEYWORDS + OTHERS):
        (root / word).mkdir(parents=True)
        for s, speaker in enumerate(TRAIN + VAL + TEST):
            name = f"{word}/{speaker}_nohash_0.wav"
            sf.write(root / name, clip(100 * w + s), SR, subtype="PCM_16")
            files.append(name)
    # one extra validation keyword: 11 keywords -> ceil(1.1) = 2 silence and 2 unknown
    sf.write(root / "yes/spk5_nohash_1.wav", clip(999), SR, subtype="PCM_16")
    files.append("yes/spk5_nohash_1.wav")
    (root / sc.BACKGROUND).mkdir()
    rng = np.random.default_rng(7)
    for name in ("white_noise.wav", "hum.wav"):
        sf.write(root / sc.BACKGROUND / name,
                 (0.1 * rng.standard_normal(2 * SR)).astype(np.float32), SR, subtype="PCM_16")
    if lists:
        for list_name, speakers in ((sc.VALIDATION_LIST, VAL), (sc.TESTING_LIST, TEST)):
            lines = [f for f in files if f.split("/")[1].split("_")[0] in speakers]
            (root / list_name).write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def corpus_template(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("gsc") / "corpus")


@pytest.fixture
def corpus(corpus_template, tmp_path) -> Path:
    """A private copy, free to damage."""
    return Path(shutil.copytree(corpus_template, tmp_path / "corpus"))


def speaker(name: str) -> str:
    return Path(name).name.split("_nohash_")[0]


def loader(root, tmp_path, **kw):
    kw.setdefault("cache_dir", tmp_path / "cache")
    kw.setdefault("progress", False)
    return lambda task, split: load_speech_commands(task, split, root, **kw)


def test_which_set_known_values():
    # By hand: p = (last 27 bits of sha1(name)) * 100 / (2**27 - 1); the last 8 hex digits
    # of the digests are spk5 ...78161fc2, spk21 ...d0ca4282, spk30 ...612e4b72,
    # spk0 ...4ac79fda. Masking 27 bits (0x7ffffff):
    #   spk5:  0x0161fc2 =   1,449,922 ->  1.080 %  -> val
    #   spk21: 0x0ca4282 =  13,255,298 ->  9.876 %  -> val (test with val_pct=9)
    #   spk30: 0x12e4b72 =  19,811,186 -> 14.761 %  -> test
    #   spk0:  0x2c79fda =  46,637,018 -> 34.747 %  -> train
    assert which_set("spk5_nohash_0.wav") == "val"
    assert which_set("yes/spk21_nohash_3.wav") == "val"
    assert which_set("spk21_nohash_3.wav", val_pct=9) == "test"
    assert which_set("/x/go/spk30_nohash_1.wav") == "test"
    assert which_set("spk0_nohash_0.wav") == "train"
    assert which_set("spk30_nohash_0.wav", val_pct=10, test_pct=4) == "train"
    # everything after _nohash_ is ignored: all takes of a speaker share the split
    assert {which_set(f"dog/spk5_nohash_{i}.wav") for i in range(5)} == {"val"}
    with pytest.raises(ValueError, match="val_pct=60"):
        which_set("a.wav", val_pct=60, test_pct=50)


def test_split_membership_from_lists(corpus):
    splits = {s: split_files(corpus, s) for s in ("train", "val", "test")}
    for split, speakers in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        files = [f for fs in splits[split].values() for f in fs]
        assert {speaker(f) for f in files} == set(speakers)
        assert len(files) == 12 * len(speakers) + (split == "val")
    # a list file outranks the hash: move one train file into the test list
    with open(corpus / sc.TESTING_LIST, "a") as f:
        f.write("cat/spk0_nohash_0.wav\n")
    assert "cat/spk0_nohash_0.wav" in split_files(corpus, "test")["cat"]
    assert "cat/spk0_nohash_0.wav" not in split_files(corpus, "train")["cat"]


def test_split_by_hash_without_lists(corpus):
    with_lists = {s: split_files(corpus, s) for s in ("train", "val", "test")}
    (corpus / sc.VALIDATION_LIST).unlink()
    (corpus / sc.TESTING_LIST).unlink()
    for split in ("train", "val", "test"):
        hashed = split_files(corpus, split)
        assert hashed == with_lists[split]
        assert all(which_set(f) == split for fs in hashed.values() for f in fs)


def test_one_list_file_is_an_error(corpus):
    (corpus / sc.TESTING_LIST).unlink()
    with pytest.raises(ValueError, match="validation_list.txt but no testing_list.txt"):
        split_files(corpus, "train")


@pytest.mark.parametrize("split, keywords", [("train", 40), ("val", 11), ("test", 10)])
def test_kws12_recipe_counts(corpus_template, tmp_path, split, keywords):
    ds = loader(corpus_template, tmp_path)("kws12", split)
    assert ds.classes == KWS12_CLASSES
    counts = Counter(ds.classes[t] for t in ds.targets)
    extra = math.ceil(keywords / 10)
    assert counts["_silence_"] == counts["_unknown_"] == extra
    assert sum(counts[w] for w in KEYWORDS) == keywords and len(ds) == keywords + 2 * extra
    unknown = [f for f, t in zip(ds.files, ds.targets) if t == 1]
    assert {Path(f).parent.name for f in unknown} <= set(OTHERS)
    silence = [f for f, t in zip(ds.files, ds.targets) if t == 0]
    assert all(sc.BACKGROUND in f for f in silence)  # cut from the noise files
    assert ds.lengths.tolist() == [99] * len(ds) and ds.num_features == 32
    assert np.isfinite(ds.data).all()


def test_kws12_deterministic_by_seed(corpus_template, tmp_path):
    a = loader(corpus_template, tmp_path, seed=3)("kws12", "train")
    b = loader(corpus_template, tmp_path, seed=3, cache=False)("kws12", "train")
    c = loader(corpus_template, tmp_path, seed=4)("kws12", "train")
    assert a.files == b.files and a.targets == b.targets
    np.testing.assert_array_equal(a.data, b.data)
    assert a.files != c.files  # another seed draws other unknown clips / noise cuts
    keyword_files = [f for f, t in zip(a.files, a.targets) if t >= 2]
    assert keyword_files == [f for f, t in zip(c.files, c.targets) if t >= 2]


def test_kws35_uses_every_word(corpus_template, tmp_path):
    ds = load("kws35", "train", corpus_template, cache_dir=tmp_path / "c", progress=False)
    assert ds.classes == sorted(KEYWORDS + OTHERS)
    assert Counter(ds.targets) == {i: len(TRAIN) for i in range(12)}
    assert ds.files == sorted(ds.files)  # file order kept
    assert all(ds.classes[t] == Path(f).parent.name for f, t in zip(ds.files, ds.targets))


def test_cache_hit_on_second_load(corpus_template, tmp_path, monkeypatch):
    first = loader(corpus_template, tmp_path)("kws12", "test")

    def boom(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(F, "compute_many", boom)
    second = loader(corpus_template, tmp_path)("kws12", "test")
    np.testing.assert_array_equal(second.data, first.data)
    with pytest.raises(AssertionError, match="recomputed"):  # other seed: other items
        loader(corpus_template, tmp_path, seed=1)("kws12", "test")
    with pytest.raises(AssertionError, match="recomputed"):  # other features
        loader(corpus_template, tmp_path, n_mels=20)("kws12", "test")


@pytest.mark.parametrize("kind", ["corrupt", "empty", "stereo"])
def test_bad_wav_skipped_or_strict(corpus, tmp_path, kind):
    bad = corpus / "yes" / "spk0_nohash_9.wav"
    if kind == "corrupt":
        bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 3)
    elif kind == "empty":
        bad.write_bytes(b"")
    else:
        sf.write(bad, np.stack([clip(1), clip(2)], axis=1), SR)
    with pytest.warns(UserWarning, match=rf"skipped 1 .*{bad.name}"):
        ds = loader(corpus, tmp_path)("kws35", "train")
    assert len(ds) == 12 * len(TRAIN) and str(bad) not in ds.files
    with pytest.raises(AudioError, match=bad.name):
        loader(corpus, tmp_path, strict=True, cache=False)("kws35", "train")


def test_list_naming_missing_wav(corpus, tmp_path):
    with open(corpus / sc.TESTING_LIST, "a") as f:
        f.write("yes/ghost_nohash_0.wav\n")
    with pytest.warns(UserWarning, match="ghost_nohash_0.wav .*listed in testing_list.txt"):
        ds = loader(corpus, tmp_path)("kws35", "test")
    assert len(ds) == 12
    with pytest.raises(FileNotFoundError, match="ghost_nohash_0.wav.*testing_list.txt"):
        loader(corpus, tmp_path, strict=True)("kws35", "test")


def test_augmentation_on_the_fly(corpus_template, tmp_path):
    ds = loader(corpus_template, tmp_path, augment=True, seed=1)("kws12", "train")
    assert isinstance(ds, sc.AugmentedSpeechCommands)
    plain = loader(corpus_template, tmp_path, seed=1)("kws12", "train")
    assert ds.files == plain.files and ds.targets == plain.targets and ds.classes == plain.classes
    x0, y0 = ds[5]
    assert x0.shape == (99, 32) and y0 == plain.targets[5]
    assert ds.lengths.tolist() == plain.lengths.tolist()
    np.testing.assert_array_equal(ds[5][0], x0)  # deterministic within an epoch
    assert not np.allclose(x0, plain[5][0])  # ... and actually augmented
    ds.set_epoch(1)
    assert not np.allclose(ds[5][0], x0)  # a fresh draw next epoch
    assert len(list((tmp_path / "cache").glob("kws12-*-train-*.npz"))) == 1  # `plain` only
    # val and test never augment
    val = loader(corpus_template, tmp_path, augment=True, seed=1)("kws12", "val")
    assert isinstance(val, FeatureDataset)


def test_missing_root_and_missing_keywords(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="speech_commands_v0.02.tar.gz"):
        load_speech_commands("kws12", "train", tmp_path / "absent", progress=False)
    shutil.rmtree(corpus / "stop")
    with pytest.raises(ValueError, match="lacks keyword folder.*stop"), \
            pytest.warns(UserWarning, match="stop/spk5_nohash_0.wav .*listed in"):
        loader(corpus, tmp_path)("kws12", "train")
    with pytest.raises(ValueError, match="task='kws10'"):
        loader(corpus, tmp_path)("kws10", "train")


def test_default_root_is_generated_synthetic_corpus(corpus_template, tmp_path, monkeypatch):
    """``root=None``: the synthetic corpus under data_home(), made by synth_kws.generate."""
    from str_rnn.datasets import synth_kws

    calls = []

    def fake_generate(out_dir, **kwargs):
        calls.append(Path(out_dir))
        if not Path(out_dir).exists():
            shutil.copytree(corpus_template, out_dir)
        return Path(out_dir)

    monkeypatch.setenv("STR_RNN_DATA", str(tmp_path / "home"))
    monkeypatch.setattr(synth_kws, "generate", fake_generate)
    monkeypatch.setattr(synth_kws, "is_complete", lambda path: Path(path).is_dir())
    ds = load_speech_commands("kws35", "test", progress=False)
    assert calls == [tmp_path / "home" / "synth_kws"]
    assert len(ds) == 12 and list((tmp_path / "home" / "cache").glob("kws35-*.npz"))
    load_speech_commands("kws35", "val", progress=False)  # complete now: not regenerated
    assert len(calls) == 1
