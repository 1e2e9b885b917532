"""The synthetic keyword corpus: Speech Commands layout, determinism, splits, recovery.

A tiny corpus (4 speakers) is generated once per module into a temp folder; a few tests
generate more. Skipped when espeakng-loader is not installed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("espeakng_loader")
pytest.importorskip("scipy")

from str_rnn.datasets import espeak, synth_kws  # noqa: E402
from str_rnn.datasets.speech_commands import which_set  # noqa: E402

if not espeak.is_available():  # pragma: no cover
    pytest.skip("libespeak-ng of espeakng-loader not found", allow_module_level=True)

SPEAKERS = 4
NAME = re.compile(r"^[0-9a-f]{8}_nohash_\d+\.wav$")


def gen(path, **kw):
    kw.setdefault("speakers", SPEAKERS)
    kw.setdefault("progress", False)
    return synth_kws.generate(path, **kw)


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return gen(tmp_path_factory.mktemp("synth") / "kws", workers=1)


def read(path: Path) -> tuple[np.ndarray, int, int, int]:
    with wave.open(str(path), "rb") as w:
        return (np.frombuffer(w.readframes(w.getnframes()), "<i2"), w.getframerate(),
                w.getnchannels(), w.getsampwidth())


# ---------------------------------------------------------------------------- layout
def test_layout_is_speech_commands(corpus):
    manifest = json.loads((corpus / "manifest.json").read_text())
    words = sorted(p.name for p in corpus.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    assert words == sorted(synth_kws.WORDS)
    assert set(synth_kws.KEYWORDS) <= set(words)
    for word in words:
        clips = sorted((corpus / word).iterdir())
        takes = synth_kws.DEFAULT_TAKES if word in synth_kws.KEYWORDS else 1
        assert len(clips) == SPEAKERS * takes, word
        for clip in clips:
            assert NAME.match(clip.name), clip
            samples, sr, channels, width = read(clip)
            assert (sr, channels, width, samples.size) == (16000, 1, 2, 16000)
            assert clip.stat().st_size == 44 + 32000  # plain PCM, no extra chunks
    assert manifest["clips"] == sum(len(list((corpus / w).iterdir())) for w in words)
    noise = sorted((corpus / "_background_noise_").glob("*.wav"))
    assert [p.stem for p in noise] == sorted(synth_kws.BACKGROUND_NOISES)
    for p in noise:
        samples, sr, channels, width = read(p)
        assert (sr, channels, width) == (16000, 1, 2) and samples.size >= 30 * 16000
        assert samples.std() > 100  # audible noise, not silence
    for name in ("validation_list.txt", "testing_list.txt", "speakers.csv", "clips.csv"):
        assert (corpus / name).is_file()


def test_clips_hold_speech_at_the_recorded_snr(corpus):
    """A clip's loudest 0.3 s is louder than its quietest 0.3 s (a word in noise),
    and clips.csv describes every clip."""
    import csv

    rows = list(csv.DictReader((corpus / "clips.csv").open()))
    assert sorted(r["path"] for r in rows) == sorted(
        f"{w}/{p.name}" for w in synth_kws.WORDS for p in (corpus / w).iterdir())
    louder = []
    for r in rows:
        x = read(corpus / r["path"])[0].astype(float)
        assert np.abs(x).max() <= 0.98 * 32767 + 1  # no clipping
        energy = np.convolve(x**2, np.ones(4800) / 4800, mode="valid")
        louder.append(10 * np.log10(energy.max() / max(energy.min(), 1e-9)))
        assert float(r["word_s"]) <= 0.92 and 0 <= float(r["offset_s"]) <= 1 - float(r["word_s"])
    # at a clip's SNR of about 5 dB or more, the word stands out by several dB
    snr = np.array([float(r["snr_db"]) for r in rows])
    assert np.median(np.array(louder)[snr > 5]) > 6


# ---------------------------------------------------------------------------- splits
def test_lists_follow_the_hashing_rule_and_split_by_speaker(corpus):
    val = (corpus / "validation_list.txt").read_text().split()
    test = (corpus / "testing_list.txt").read_text().split()
    assert val and test and not set(val) & set(test)
    clips = [f"{w}/{p.name}" for w in synth_kws.WORDS for p in sorted((corpus / w).iterdir())]
    for clip in clips:
        expected = which_set(clip)
        actual = "val" if clip in val else "test" if clip in test else "train"
        assert actual == expected, clip
    speakers = {s: {which_set(c) for c in clips if Path(c).name.startswith(s)}
                for s in {Path(c).name[:8] for c in clips}}
    assert len(speakers) == SPEAKERS and all(len(v) == 1 for v in speakers.values())
    # 4 speakers: at least one validation and one test voice, the rest train
    assert sorted(v.pop() for v in speakers.values()) == ["test", "train", "train", "val"]


def test_default_size_has_enough_test_voices():
    quota = synth_kws._split_quota(synth_kws.DEFAULT_SPEAKERS)
    assert quota["test"] >= 100 and quota["val"] >= 100
    assert quota["test"] * len(synth_kws.KEYWORDS) * synth_kws.DEFAULT_TAKES >= 2000


# ---------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_whatever_the_workers(corpus, tmp_path):
    again = gen(tmp_path / "again", workers=2)
    a, b = files(corpus), files(again)
    assert a.keys() == b.keys()
    different = [k for k in a if a[k] != b[k]]
    assert not different, different[:5]


def test_other_seed_other_corpus(corpus, tmp_path):
    other = gen(tmp_path / "other", seed=1, workers=1)
    m0 = json.loads((corpus / "manifest.json").read_text())
    m1 = json.loads((other / "manifest.json").read_text())
    assert m0["content_sha1"] != m1["content_sha1"]
    ids0 = {p.name[:8] for p in (corpus / "yes").iterdir()}
    ids1 = {p.name[:8] for p in (other / "yes").iterdir()}
    assert ids0 != ids1
    noise0 = (corpus / "_background_noise_" / "white_noise.wav").read_bytes()
    assert noise0 != (other / "_background_noise_" / "white_noise.wav").read_bytes()


@pytest.mark.parametrize("variant", ["m3", "caleb"])  # caleb: Klatt + breath, uses libc rand()
def test_espeak_instance_output_depends_only_on_its_own_calls(variant):
    """libespeak-ng leaks state between utterances (and some voices use libc's rand()),
    which is why every speaker gets a freshly loaded instance with seeded generators."""
    def session():
        with espeak.Espeak() as tts:
            tts.synth("sheila", voice="en-US", variant="f2")
            return tts.synth("marvin", voice="en-GB-scotland", variant=variant, rate=150, seed=5)

    first = session()
    with espeak.Espeak() as tts:  # disturb everything a fresh instance must not see
        for text in ("a much longer sentence than that", "zero one two"):
            tts.synth(text, voice="en-029", variant="caleb", seed=9)
    assert first.dtype == np.int16 and first.size > 0.2 * espeak.SAMPLE_RATE
    np.testing.assert_array_equal(first, session())


def test_espeak_errors():
    with espeak.Espeak() as tts:
        assert tts.sample_rate == espeak.SAMPLE_RATE and re.match(r"\d+\.\d+", tts.version)
        assert {"en-US", "en-GB-scotland"} <= {v.key for v in tts.list_voices("en")}
        assert {"m1", "f2", "klatt"} <= {v.key for v in tts.list_voices("variant")}
        with pytest.raises(espeak.EspeakError, match="another Espeak instance"):
            espeak.Espeak()
        with pytest.raises(ValueError, match="no-such-voice"):
            tts.synth("yes", voice="no-such-voice")
        with pytest.raises(ValueError, match=r"rate=10 .*\[80, 450\]"):
            tts.synth("yes", rate=10)
    with pytest.raises(espeak.EspeakError, match="closed"):
        tts.synth("yes")


def test_low_voices_at_the_parameter_bounds_do_not_crash():
    """libespeak-ng segfaults below its F0 floor (rob/Demonic/Annie, wide range, low
    pitch); the generator's bounds must stay clear of it. A child process, so that a
    crash fails this test instead of killing pytest."""
    code = (
        "from str_rnn.datasets.espeak import Espeak\n"
        "from str_rnn.datasets.synth_kws import _PITCH, _RANGE\n"
        "with Espeak() as t:\n"
        "    for v in ('rob', 'Demonic', 'Annie'):\n"
        "        for w in ('backward.', 'sheila?', 'visual!'):\n"
        "            t.synth(w, voice='en-US', variant=v, pitch=_PITCH[0], pitch_range=_RANGE[1], rate=95)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------------------- recovery
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_interrupted_generation_is_redone(corpus, tmp_path):
    """No manifest = not complete: the corpus is regenerated (identically), and a
    partial folder left by a killed run is cleaned up."""
    damaged = tmp_path / "kws"
    shutil.copytree(corpus, damaged)
    (damaged / "manifest.json").unlink()
    (damaged / "yes" / sorted(os.listdir(damaged / "yes"))[0]).unlink()
    stale = tmp_path / f".kws.partial-{_dead_pid()}"
    stale.mkdir()
    (stale / ".synth_kws").write_text("")
    assert not synth_kws.is_complete(damaged)
    gen(damaged, workers=1)
    assert synth_kws.is_complete(damaged) and not stale.exists()
    assert files(damaged) == files(corpus)
    assert not list(tmp_path.glob(".kws.*"))  # no partial or stale folders left


def test_complete_corpus_is_not_regenerated(corpus):
    clip = next((corpus / "yes").iterdir())
    before = clip.stat().st_mtime_ns
    assert gen(corpus) == corpus
    assert clip.stat().st_mtime_ns == before


def test_refuses_other_arguments_and_foreign_folders(corpus, tmp_path):
    with pytest.raises(ValueError, match="seed"):
        gen(corpus, seed=3)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a synth_kws corpus"):
        gen(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("kwargs, name", [
    ({"speakers": 0}, "speakers"), ({"speakers": -3}, "speakers"), ({"speakers": 2.5}, "speakers"),
    ({"speakers": True}, "speakers"), ({"takes": 0}, "takes"), ({"other_takes": -1}, "other_takes"),
    ({"seed": -1}, "seed"), ({"seed": "0"}, "seed"), ({"workers": 0}, "workers"),
])
def test_bad_arguments(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=rf"{name}=.*must be an integer >= "):
        synth_kws.generate(tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------- baseline
def test_order_free_baseline_runs_on_the_corpus(corpus, tmp_path, capsys):
    """benchmarks/order_free_baseline.py end to end on the tiny corpus (no feature cache)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "order_free_baseline.py"
    spec = importlib.util.spec_from_file_location("order_free_baseline", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "result.json"
    assert bench.main(["--task", "kws12", "--root", str(corpus), "--option", "cache=false",
                       "--no-progress", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["classes"] == 12 and result["inputs"] == 64
    assert result["n_test"] > 0 and 0 <= result["test_acc"] <= 100
    assert result["train_acc"] > 90  # 64 inputs, a few dozen training clips: separable
    assert result["max_abs_grad"] < 1e-3  # L-BFGS converged
    assert "test" in capsys.readouterr().out
