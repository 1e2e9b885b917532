"""Offline synthetic keyword-spotting corpus laid out exactly like Google Speech Commands.

:func:`generate` speaks the Speech Commands words with libespeak-ng (see
:mod:`str_rnn.datasets.espeak`) in many synthetic *speakers* and writes::

    OUT/{word}/{speaker}_nohash_{take}.wav   16 kHz, mono, 16-bit PCM, exactly 16,000 samples
    OUT/_background_noise_/*.wav            60 s noise recordings (white, pink, brown, hum,
                                            babble, machine) for the silence class / mixing
    OUT/validation_list.txt                 clips of validation speakers (Google's format)
    OUT/testing_list.txt                    clips of test speakers
    OUT/speakers.csv, OUT/clips.csv         every speaker's and every clip's parameters
    OUT/manifest.json                       written last: the corpus is complete iff it exists

A *speaker* is a deterministic draw from the seed of: accent (an English espeak voice),
voice variant (``m1``..``m8``, ``f1``..``f5``, ``klatt``..., about a hundred), base pitch,
pitch range, speaking rate, vocal-tract length (a resampling factor that shifts formants
and pitch together), a microphone (high-pass, low-pass, one resonance), a room (synthetic
reverberation), a level and a noise environment. Every take varies the rate, pitch,
intonation (``.``/``?``/``!``), time offset inside the 1 s clip, level, noise type and
signal-to-noise ratio (0 to 40 dB). Speaker ids are 8 hex digits, as in Google's corpus,
and the split follows Google's ``_nohash_`` hashing rule on the speaker id; ids are drawn
until each split has its share of speakers (80/10/10), so even a small corpus has
validation and test voices.

Difficulty: on the default corpus's kws12 task an order-free classifier (log-mel mean and
std per clip) scores 41.7% against 84.1% for a 12-epoch GRU; errors spread over most test
voices and grow as the SNR falls, with babble noise and strong reverberation.

Determinism: the same ``seed``, arguments and package versions give byte-identical files,
whatever the number of worker processes (each speaker is synthesised by a freshly loaded
espeak instance from its own random stream). ``manifest.json`` records the versions and a
SHA-1 over all files.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import struct
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

__all__ = [
    "generate", "is_complete",
    "KEYWORDS", "OTHER_WORDS", "WORDS", "BACKGROUND_NOISES", "DEFAULT_SPEAKERS",
    "DEFAULT_TAKES", "SAMPLE_RATE", "CLIP_SAMPLES", "GENERATOR_VERSION",
]

#: Bump whenever the bytes a given seed produces change.
GENERATOR_VERSION = 1

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
#: Google's other words (v0.01) and the five added in v0.02, so kws35 works too.
OTHER_WORDS = ("bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house",
               "marvin", "nine", "one", "seven", "sheila", "six", "three", "tree", "two",
               "wow", "zero", "backward", "follow", "forward", "learn", "visual")
WORDS = KEYWORDS + OTHER_WORDS
_SPOKEN = {"marvin": "Marvin", "sheila": "Sheila"}  # proper names: capitalised for espeak

#: Default corpus size: 1,100 speakers give 110 test and 110 validation voices.
DEFAULT_SPEAKERS = 1100
#: Takes of each keyword per speaker (other words get ``other_takes``, default 1).
DEFAULT_TAKES = 2
SAMPLE_RATE = 16000
CLIP_SAMPLES = 16000
VALIDATION_PERCENT = 10
TESTING_PERCENT = 10
BACKGROUND_NOISES = ("white_noise", "pink_noise", "brown_noise", "hum", "babble", "machine")
_NOISE_KINDS = ("white", "pink", "brown", "hum", "babble", "machine")
_BACKGROUND_SECONDS = 60

#: English voices of espeak-ng (en-Shaw is left out: it speaks Latin text exactly like en).
ACCENTS = ("en", "en-029", "en-GB-scotland", "en-GB-x-gbclan", "en-GB-x-gbcwmd",
           "en-GB-x-rp", "en-US", "en-US-nyc")

# libespeak-ng 1.52 crashes (segfault) when a low pitch and a wide pitch range drive F0
# below its floor on low-voiced variants (rob, Demonic, Annie at range >= 83). Every
# English voice x variant was stress-tested without a crash at the corners of these bounds
# (pitch 12 and 92 with range 10, 45 and 72, rates 95 and 450).
_PITCH = (12, 92)  # espeak pitch of any take
_PITCH_JITTER = 8  # a take's pitch is the speaker's +- this
_RANGE = (10, 72)  # espeak pitch range of any speaker
_MARKER = ".synth_kws"  # written first into every corpus folder this module builds
_MANIFEST = "manifest.json"
# espeak's 22,050 Hz -> 16 kHz is 320/441; the speaker's vocal-tract factor scales 441.
_UP, _DOWN = 320, 441
_MAX_WORD_SAMPLES = int(0.92 * SAMPLE_RATE)  # a word must leave room inside the 1 s clip

# Filler words for babble noise: none is, or sounds like, one of the 35 words.
_BABBLE_WORDS = (
    "the", "a", "and", "we", "they", "people", "water", "morning", "table", "window",
    "garden", "little", "about", "because", "coffee", "picture", "summer", "family",
    "yellow", "paper", "music", "city", "market", "doctor", "letter", "evening", "basket",
    "number", "weather", "pencil", "kitchen", "orange", "purple", "mountain", "rabbit",
    "silver", "winter", "engine", "ticket", "station", "birthday", "village", "really",
    "maybe", "together", "almost", "already", "perhaps", "butter", "island", "monkey",
    "planet", "quiet", "salad", "thinking", "under", "very", "with", "without", "where",
)


# ---------------------------------------------------------------------------- splits
def _split_quota(speakers: int) -> dict[str, int]:
    """Speakers per split: 80/10/10, at least one val and one test voice from 3 up."""
    n_val = round(speakers * VALIDATION_PERCENT / 100)
    n_test = round(speakers * TESTING_PERCENT / 100)
    if speakers >= 3:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    return {"train": speakers - n_val - n_test, "val": n_val, "test": n_test}


# ---------------------------------------------------------------------------- speakers
@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: voice, vocal tract, microphone, room and environment."""

    index: int
    id: str
    split: str  # train | val | test
    accent: str
    variant: str  # "" = the accent's own voice
    pitch: int  # espeak 0-99
    pitch_range: int  # espeak 0-99
    rate: int  # words per minute
    tract_down: int  # resampling 22,050 -> 16,000 Hz uses 320/tract_down (441 = neutral)
    highpass_hz: float
    lowpass_hz: float  # 0 = no low-pass
    peak_hz: float  # one microphone resonance / dip
    peak_db: float
    peak_q: float
    rt60_s: float  # 0 = dry
    drr_db: float  # direct-to-reverberant ratio
    level_db: float  # speech RMS, dBFS
    snr_db: float  # the speaker's typical SNR; takes vary around it
    noise: str  # the speaker's usual noise environment
    stream: int  # entropy of the speaker's own random stream


def _draw_speakers(n: int, seed: int, variants: list[str]) -> list[Speaker]:
    """Draw ids (by Google's hash, until each split has its quota) and voice parameters."""
    from .speech_commands import which_set

    rng = np.random.default_rng([seed, 0x5EED])
    quota = _split_quota(n)
    taken = {k: 0 for k in quota}
    ids: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(ids) < n:
        sid = f"{int(rng.integers(0, 2**32)):08x}"
        split = which_set(sid, VALIDATION_PERCENT, TESTING_PERCENT)
        if sid in seen or taken[split] >= quota[split]:
            continue
        seen.add(sid)
        taken[split] += 1
        ids.append((sid, split))
    everyone = [""] + list(variants)
    # Half the speakers use espeak's own voices (m1-m8, f1-f5 or none), half any of the
    # ~100 contributed variants, many of them novelty voices (robots, whispers, ...).
    standard = [""] + [v for v in variants if re.fullmatch(r"[mf]\d", v)]
    out = []
    for i, (sid, split) in enumerate(ids):
        r = np.random.default_rng([seed, 0x5BEA, i])
        reverb = r.random() < 0.5
        pool = standard if r.random() < 0.5 else everyone
        out.append(Speaker(
            index=i, id=sid, split=split,
            accent=str(r.choice(ACCENTS)),
            variant=str(pool[int(r.integers(len(pool)))]),
            pitch=int(r.integers(_PITCH[0] + _PITCH_JITTER, _PITCH[1] - _PITCH_JITTER + 1)),
            pitch_range=int(r.integers(_RANGE[0], _RANGE[1] + 1)),
            rate=int(round(math.exp(r.uniform(math.log(115), math.log(250))))),
            tract_down=int(round(_DOWN * r.uniform(0.88, 1.13))),
            highpass_hz=round(float(math.exp(r.uniform(math.log(50), math.log(300)))), 1),
            # telephone band (3.4 kHz) at the narrowest
            lowpass_hz=round(float(r.uniform(3400, 7600)), 1) if r.random() < 0.5 else 0.0,
            peak_hz=round(float(math.exp(r.uniform(math.log(250), math.log(4000)))), 1),
            peak_db=round(float(r.uniform(-8, 8)), 2),
            peak_q=round(float(r.uniform(0.7, 3.0)), 2),
            rt60_s=round(float(r.uniform(0.1, 0.6)), 3) if reverb else 0.0,
            drr_db=round(float(r.uniform(0, 15)), 2),
            level_db=round(float(r.uniform(-36, -16)), 2),
            # takes vary +-5 dB around it: 0 to 40 dB, a sixth of the clips below 10 dB
            snr_db=round(float(r.uniform(5, 35)), 2),
            noise=str(r.choice(_NOISE_KINDS)),
            stream=int(r.integers(2**63)),
        ))
    return out


# ---------------------------------------------------------------------------- DSP
def _peaking_sos(f0: float, gain_db: float, q: float, fs: int) -> np.ndarray:
    """RBJ audio-EQ-cookbook peaking biquad as one second-order section."""
    a = 10 ** (gain_db / 40)
    w0 = 2 * math.pi * f0 / fs
    alpha = math.sin(w0) / (2 * q)
    b = np.array([1 + alpha * a, -2 * math.cos(w0), 1 - alpha * a])
    den = np.array([1 + alpha / a, -2 * math.cos(w0), 1 - alpha / a])
    return np.concatenate([b / den[0], den / den[0]])[None, :]


def _channel_sos(sp: Speaker) -> np.ndarray:
    from scipy.signal import butter

    parts = [butter(2, sp.highpass_hz, "highpass", fs=SAMPLE_RATE, output="sos"),
             _peaking_sos(sp.peak_hz, sp.peak_db, sp.peak_q, SAMPLE_RATE)]
    if sp.lowpass_hz:
        parts.append(butter(4, sp.lowpass_hz, "lowpass", fs=SAMPLE_RATE, output="sos"))
    return np.concatenate(parts)


def _room_ir(sp: Speaker, rng: np.random.Generator) -> np.ndarray | None:
    """Exponentially decaying noise tail after a direct path (60 dB down at rt60).

    Cut where it is 40 dB down: the rest is below the noise of every clip.
    """
    if not sp.rt60_s:
        return None
    n = int(sp.rt60_s * 40 / 60 * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / sp.rt60_s)
    predelay = int(rng.uniform(0.002, 0.012) * SAMPLE_RATE)
    tail[:predelay] = 0.0
    tail *= 10 ** (-sp.drr_db / 20) / max(np.sqrt(np.sum(tail**2)), 1e-12)
    tail[0] = 1.0  # direct path
    return tail


def _resample_filter(down: int) -> np.ndarray:
    """The FIR ``scipy.signal.resample_poly`` would design, computed once per speaker."""
    from scipy.signal import firwin

    m = max(_UP, down)
    return firwin(2 * 10 * m + 1, 1.0 / m, window=("kaiser", 5.0))


@functools.lru_cache(maxsize=8)
def _log_freqs(n: int) -> np.ndarray:
    """log(Hz) of the rfft bins of ``n`` samples (DC clamped to 20 Hz), cached."""
    return np.log(np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 20.0))


@functools.lru_cache(maxsize=8)
def _power_law(n: int, exponent: float) -> np.ndarray:
    return np.exp(_log_freqs(n) * (-exponent / 2))


def _shaped_noise(n: int, rng: np.random.Generator, exponent: float) -> np.ndarray:
    """Gaussian noise with power spectrum ~ 1/f**exponent (pink: 1, brown: 2)."""
    return np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * _power_law(n, exponent), n)


_HUM_TABLE = 1024  # samples of one hum period in the wavetable


def _noise(kind: str, n: int, rng: np.random.Generator, babble: np.ndarray) -> np.ndarray:
    """``n`` samples of unit-RMS noise of ``kind`` (one of ``_NOISE_KINDS``)."""
    if kind == "white":
        x = rng.standard_normal(n)
    elif kind == "pink":
        x = _shaped_noise(n, rng, 1.0)
    elif kind == "brown":
        x = _shaped_noise(n, rng, 2.0)
    elif kind == "hum":
        # Mains hum: 50 or 60 Hz with decaying, randomly phased harmonics over a faint hiss.
        # One period is built as a wavetable, then read at the hum frequency (a sum of
        # sines over the whole clip costs 50x more).
        f0 = (50.0 if rng.random() < 0.5 else 60.0) * rng.uniform(0.995, 1.005)
        decay = rng.uniform(0.4, 1.5)
        k = np.arange(1, 40)[:, None]
        phase = 2 * np.pi * np.arange(_HUM_TABLE) / _HUM_TABLE
        table = np.sum(k ** -decay * np.sin(k * phase + rng.uniform(0, 2 * np.pi, (39, 1))), 0)
        pos = (f0 * _HUM_TABLE / SAMPLE_RATE * np.arange(n) + rng.uniform(0, _HUM_TABLE))
        x = table[pos.astype(np.int64) % _HUM_TABLE]
        x = x / np.sqrt(np.mean(table**2)) + 0.03 * rng.standard_normal(n)
    elif kind == "babble":
        idx = (int(rng.integers(len(babble))) + np.arange(n)) % len(babble)
        x = babble[idx].astype(np.float64)
    elif kind == "machine":
        # Band-limited noise with a motor-like amplitude modulation and a whine.
        spec = np.fft.rfft(rng.standard_normal(n))
        log_fc = rng.uniform(math.log(150), math.log(3000))
        spec *= np.exp(-0.5 * ((_log_freqs(n) - log_fc) / rng.uniform(0.3, 1.0)) ** 2)
        t = np.arange(n) / SAMPLE_RATE
        x = np.fft.irfft(spec, n)
        x /= max(np.sqrt(np.mean(x**2)), 1e-12)
        x *= 1 + rng.uniform(0.3, 0.9) * np.sin(2 * np.pi * rng.uniform(2, 30) * t)
        x += 0.3 * np.sin(2 * np.pi * rng.uniform(100, 1200) * t)
    else:  # pragma: no cover - internal
        raise ValueError(f"noise kind {kind!r} is not one of {_NOISE_KINDS}")
    return x / max(np.sqrt(np.mean(x**2)), 1e-12)


def _trim(x: np.ndarray) -> np.ndarray:
    """Cut espeak's leading/trailing silence (below -50 dB of the peak), keep 5 ms."""
    idx = np.flatnonzero(np.abs(x) > 10 ** (-50 / 20) * np.max(np.abs(x)))
    if idx.size == 0:
        return x
    pad = int(0.005 * 22050)
    return x[max(idx[0] - pad, 0): idx[-1] + pad + 1]


def _wav_bytes(pcm: np.ndarray) -> bytes:
    """A canonical 44-byte-header RIFF/WAVE file: mono, 16-bit, 16 kHz."""
    data = pcm.astype("<i2").tobytes()
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(data), b"WAVE", b"fmt ", 16,
                         1, 1, SAMPLE_RATE, SAMPLE_RATE * 2, 2, 16, b"data", len(data))
    return header + data


def _to_pcm(x: np.ndarray) -> np.ndarray:
    peak = float(np.max(np.abs(x)))
    if peak > 0.98:  # an input AGC rather than wrap-around or hard clipping
        x = x * (0.98 / peak)
    return np.round(x * 32767).astype(np.int16)


# ---------------------------------------------------------------------------- synthesis
@dataclass(frozen=True)
class _Take:
    """The random choices of one take (drawn before synthesis, in a fixed order)."""

    rate: int
    pitch: int
    punct: str
    espeak_seed: int
    where: float  # position of the word in the free part of the clip, 0..1
    level_db: float
    snr_db: float
    noise: str
    noise_seed: int

    @staticmethod
    def draw(sp: Speaker, rng: np.random.Generator) -> _Take:
        return _Take(
            rate=int(np.clip(round(sp.rate * rng.uniform(0.85, 1.2)), 80, 450)),
            pitch=int(np.clip(sp.pitch + rng.integers(-_PITCH_JITTER, _PITCH_JITTER + 1), *_PITCH)),
            punct=str(rng.choice([".", "?", "!"], p=[0.6, 0.2, 0.2])),  # intonation
            espeak_seed=int(rng.integers(2**31)),
            where=float(rng.random()),
            level_db=sp.level_db + float(rng.uniform(-4, 4)),
            snr_db=sp.snr_db + float(rng.uniform(-5, 5)),
            noise=sp.noise if rng.random() < 0.75 else str(rng.choice(_NOISE_KINDS)),
            noise_seed=int(rng.integers(2**63)),
        )


class _Recorder:
    """A speaker's voice and recording chain: espeak -> vocal tract -> mic -> room."""

    def __init__(self, sp: Speaker, rng: np.random.Generator, babble: np.ndarray):
        from scipy.fft import next_fast_len, rfft

        self.sp, self.babble = sp, babble
        self.fir = _resample_filter(sp.tract_down)
        self.sos = _channel_sos(sp)
        self.rir = _room_ir(sp, rng)
        if self.rir is not None:  # the room's transfer function, computed once
            self.nfft = next_fast_len(_MAX_WORD_SAMPLES + len(self.rir) - 1, real=True)
            self.room = rfft(self.rir, self.nfft)

    def speak(self, tts, text: str, rate: int, pitch: int, seed: int) -> tuple[np.ndarray, int]:
        """Synthesise, trim and resample one word to 16 kHz; faster if it would not fit.

        Returns:
            ``(samples, rate actually used)``.
        """
        from scipy.signal import resample_poly

        sp = self.sp
        for _ in range(4):
            raw = tts.synth(text, voice=sp.accent, variant=sp.variant or None, rate=rate,
                            pitch=pitch, pitch_range=sp.pitch_range, seed=seed)
            if raw.size == 0:
                raise RuntimeError(f"espeak-ng produced no audio for {text!r} with {sp}")
            x = resample_poly(_trim(raw.astype(np.float64) / 32768.0), _UP, sp.tract_down,
                              window=self.fir)
            if len(x) <= _MAX_WORD_SAMPLES or rate >= 450:
                break
            rate = min(450, int(math.ceil(rate * len(x) / _MAX_WORD_SAMPLES * 1.05)))
        return x[:_MAX_WORD_SAMPLES], rate

    def record(self, tts, word: str, take: _Take) -> tuple[np.ndarray, dict]:
        """One 1 s clip (int16) of ``word`` and what was done to make it."""
        from scipy.fft import irfft, rfft
        from scipy.signal import sosfilt

        x, rate = self.speak(tts, _SPOKEN.get(word, word) + take.punct, take.rate, take.pitch,
                             take.espeak_seed)
        x = sosfilt(self.sos, x)
        n_word = len(x)
        if self.rir is not None:  # the reverberant tail may run past the clip's end
            x = irfft(rfft(x, self.nfft) * self.room, self.nfft)[: n_word + len(self.rir) - 1]
        offset = int(take.where * (CLIP_SAMPLES - n_word + 1))
        clip = np.zeros(CLIP_SAMPLES)
        seg = x[: CLIP_SAMPLES - offset]
        clip[offset: offset + len(seg)] = seg
        # Level and SNR refer to the word itself (its RMS), not to the whole second.
        speech_rms = max(float(np.sqrt(np.mean(x[:n_word] ** 2))), 1e-9)
        noise = _noise(take.noise, CLIP_SAMPLES, np.random.default_rng(take.noise_seed), self.babble)
        clip = (clip / speech_rms + noise * 10 ** (-take.snr_db / 20)) * 10 ** (take.level_db / 20)
        info = {"rate": rate, "pitch": take.pitch, "punct": take.punct,
                "offset_s": round(offset / SAMPLE_RATE, 4), "word_s": round(n_word / SAMPLE_RATE, 4),
                "level_db": round(take.level_db, 2), "snr_db": round(take.snr_db, 2),
                "noise": take.noise}
        return _to_pcm(clip), info


def _takes(word: str, takes: int, other_takes: int) -> int:
    return takes if word in KEYWORDS else other_takes


_worker_babble: np.ndarray | None = None  # the clip babble bank, set once per worker


def _init_worker(babble: np.ndarray) -> None:
    global _worker_babble
    _worker_babble = babble


def _speaker_job(args) -> list[dict]:
    """Synthesise every take of one speaker into ``root``; return one row per clip."""
    from .espeak import Espeak

    sp, root, takes, other_takes = args
    rng = np.random.default_rng(sp.stream)
    recorder = _Recorder(sp, rng, _worker_babble)
    rows = []
    with Espeak() as tts:  # a fresh library: the output depends on this speaker only
        for word in WORDS:
            for n in range(_takes(word, takes, other_takes)):
                pcm, info = recorder.record(tts, word, _Take.draw(sp, rng))
                data = _wav_bytes(pcm)
                path = f"{word}/{sp.id}_nohash_{n}.wav"
                (Path(root) / path).write_bytes(data)
                rows.append({"path": path, "speaker": sp.id, "word": word, "take": n,
                             "split": sp.split, **info, "sha1": hashlib.sha1(data).hexdigest()})
    return rows


def _babble(seconds: float, rng: np.random.Generator, variants: list[str], talkers: int = 6):
    """Overlapped speech of ``talkers`` random voices saying filler sentences, at 16 kHz."""
    from scipy.signal import resample_poly

    from .espeak import Espeak

    n = int(seconds * SAMPLE_RATE)
    n_raw = int(seconds * 22050)
    out = np.zeros(n)
    with Espeak() as tts:
        for _ in range(talkers):
            voice, variant = str(rng.choice(ACCENTS)), str(rng.choice(variants))
            pitch, rate = int(rng.integers(_PITCH[0], _PITCH[1] + 1)), int(rng.integers(130, 220))
            pieces, length = [], 0
            while length < n_raw:
                pause = np.zeros(int(rng.integers(0, 22050 // 2)))
                words = rng.choice(_BABBLE_WORDS, size=int(rng.integers(4, 12)))
                raw = tts.synth(" ".join(words) + ".", voice=voice, variant=variant,
                                rate=rate, pitch=pitch, seed=int(rng.integers(2**31)))
                x = raw.astype(np.float64) / 32768.0
                x /= max(np.sqrt(np.mean(x**2)), 1e-9)  # talkers equally loud on average
                pieces += [pause, x]
                length += len(pause) + len(x)
            stream = resample_poly(np.concatenate(pieces)[:n_raw], _UP, _DOWN)[:n]
            out[: len(stream)] += stream * rng.uniform(0.5, 1.0)
    return out / max(np.sqrt(np.mean(out**2)), 1e-12)


# ---------------------------------------------------------------------------- corpus
def _config(seed: int, speakers: int, takes: int, other_takes: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "seed": seed, "speakers": speakers,
            "takes": takes, "other_takes": other_takes}


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_complete(out_dir: str | os.PathLike) -> bool:
    """True when ``out_dir`` holds a finished corpus (its ``manifest.json`` is readable)."""
    return _read_manifest(Path(out_dir)) is not None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_partials(out_dir: Path) -> None:
    """Delete ``.NAME.partial-PID`` folders left by generations that were killed."""
    for p in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid) and (p / _MARKER).exists():
            shutil.rmtree(p, ignore_errors=True)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def generate(out_dir: str | os.PathLike, *, speakers: int = DEFAULT_SPEAKERS, seed: int = 0,
             takes: int = DEFAULT_TAKES, other_takes: int = 1, workers: int | None = None,
             progress: bool = True) -> Path:
    """Generate the synthetic Speech-Commands-layout corpus into ``out_dir``.

    Nothing is done when ``out_dir`` already holds a complete corpus made with the same
    arguments. The corpus is built in a hidden sibling folder and renamed into place after
    ``manifest.json`` is written, so an interrupted run never looks complete; a folder of
    ours without a manifest (a damaged corpus) is regenerated.

    The default (1,100 speakers, 2 takes of each keyword, 1 of each other word) has 880 /
    110 / 110 train / validation / test speakers, 49,500 clips (4,950 of them test,
    2,200 of those keywords) and 1.6 GB; it takes about 145 CPU seconds (90 s on 2 free
    cores). On its kws12 task an order-free softmax regression on log-mel mean and std
    scores 41.7% (``benchmarks/order_free_baseline.py``), a GRU-100 trained 12 epochs
    84.1% (``str-rnn train --task kws12 --data DIR --cell gru --mode dense --epochs 12
    --lr 3e-3``).

    Args:
        out_dir: corpus folder to create.
        speakers: number of synthetic speakers (>= 1; from 3 up every split has one).
        seed: seed of every random draw (>= 0).
        takes: takes of each of the 10 keywords per speaker (>= 1).
        other_takes: takes of each of the 25 other words per speaker (>= 0).
        workers: worker processes (default: the CPU count, at most 8); the output does
            not depend on it.
        progress: show a tqdm progress bar over speakers.

    Returns:
        ``Path(out_dir)``.

    Raises:
        ValueError: an argument is out of range, or ``out_dir`` holds a complete corpus
            generated with other arguments.
        FileExistsError: ``out_dir`` exists, is not empty and is not a corpus of ours.
        EspeakError: espeakng-loader is not installed.
    """
    speakers = _check_int("speakers", speakers, 1)
    seed = _check_int("seed", seed, 0)
    takes = _check_int("takes", takes, 1)
    other_takes = _check_int("other_takes", other_takes, 0)
    if workers is not None:
        workers = _check_int("workers", workers, 1)
    out_dir = Path(out_dir)
    config = _config(seed, speakers, takes, other_takes)

    manifest = _read_manifest(out_dir)
    if manifest is not None:
        old = {k: manifest.get(k) for k in config}
        if old != config:
            raise ValueError(f"out_dir={str(out_dir)!r} holds a corpus generated with {old}, "
                             f"not {config}; choose another folder or delete it")
        return out_dir
    if out_dir.exists() and not (out_dir.is_dir() and (
            not any(out_dir.iterdir()) or (out_dir / _MARKER).exists())):
        raise FileExistsError(f"out_dir={str(out_dir)!r} exists and is not a synth_kws corpus; "
                              "refusing to overwrite it")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _build(tmp, config, workers, progress)
        _install(tmp, out_dir, config)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _build(root: Path, config: dict, workers: int | None, progress: bool) -> None:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    import scipy
    from tqdm import tqdm

    from .espeak import Espeak, package_version

    (root / _MARKER).write_text("partial or complete str_rnn synth_kws corpus\n")
    seed, n_speakers = config["seed"], config["speakers"]
    with Espeak() as tts:
        variants = sorted(v.key for v in tts.list_voices("variant"))
        known = {v.key for v in tts.list_voices("en")}
        versions = {"espeak_ng": tts.version, "espeakng_loader": package_version(),
                    "numpy": np.__version__, "scipy": scipy.__version__}
    missing = sorted(set(ACCENTS) - known)
    if missing:
        raise RuntimeError(f"this espeak-ng data lacks the voices {missing}")
    speakers = _draw_speakers(n_speakers, seed, variants)

    # Noise: one babble bank mixed into clips, independent long recordings for the folder.
    rng = np.random.default_rng([seed, 0xBAB])
    clip_babble = _babble(20.0, rng, variants).astype(np.float32)
    bg = root / "_background_noise_"
    bg.mkdir()
    bg_babble = _babble(_BACKGROUND_SECONDS, rng, variants)
    hashes: dict[str, str] = {}
    for name, kind in zip(BACKGROUND_NOISES, _NOISE_KINDS):
        x = _noise(kind, _BACKGROUND_SECONDS * SAMPLE_RATE, rng, bg_babble)
        data = _wav_bytes(_to_pcm(x * 10 ** (-20 / 20)))  # -20 dBFS RMS
        (bg / f"{name}.wav").write_bytes(data)
        hashes[f"_background_noise_/{name}.wav"] = hashlib.sha1(data).hexdigest()

    for word in WORDS:
        (root / word).mkdir()
    jobs = [(sp, str(root), config["takes"], config["other_takes"]) for sp in speakers]
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    workers = min(workers, n_speakers)
    rows: list[dict] = []
    bar = tqdm(total=n_speakers, desc="synth_kws speakers", unit="spk", disable=not progress)
    try:
        if workers == 1:
            _init_worker(clip_babble)
            for job in jobs:
                rows.extend(_speaker_job(job))
                bar.update()
        else:
            # fork keeps start-up cheap; each job loads its own espeak, so fork is safe.
            # A process pool executor (not multiprocessing.Pool, which waits forever for
            # the result of a worker that died) turns a crash in the C library into an error.
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else "spawn")
            with ProcessPoolExecutor(workers, ctx, _init_worker, (clip_babble,)) as pool:
                try:
                    for r in pool.map(_speaker_job, jobs, chunksize=4):
                        rows.extend(r)
                        bar.update()
                except BrokenProcessPool as err:
                    raise RuntimeError(
                        "a synth_kws worker process died, most likely because libespeak-ng "
                        "crashed on a voice setting; please report the seed and speakers "
                        "arguments") from err
    finally:
        bar.close()
    rows.sort(key=lambda r: r["path"])

    for split, fname in (("val", "validation_list.txt"), ("test", "testing_list.txt")):
        lines = "".join(r["path"] + "\n" for r in rows if r["split"] == split)
        (root / fname).write_text(lines)
    _write_csv(root / "speakers.csv", [asdict(s) for s in speakers], [f.name for f in fields(Speaker)])
    _write_csv(root / "clips.csv", rows, list(rows[0]) if rows else ["path"])
    for r in rows:
        hashes[r["path"]] = r["sha1"]
    for fname in ("validation_list.txt", "testing_list.txt", "speakers.csv", "clips.csv"):
        hashes[fname] = hashlib.sha1((root / fname).read_bytes()).hexdigest()
    content = hashlib.sha1("".join(f"{k} {v}\n" for k, v in sorted(hashes.items())).encode())

    splits = {}
    for split in ("train", "val", "test"):
        split_rows = [r for r in rows if r["split"] == split]
        splits[split] = {
            "speakers": sum(s.split == split for s in speakers),
            "clips": len(split_rows),
            "keyword_clips": sum(r["word"] in KEYWORDS for r in split_rows),
        }
    manifest = {
        "format": "google_speech_commands", "generator": __name__, **config,
        "versions": versions, "sample_rate": SAMPLE_RATE, "clip_samples": CLIP_SAMPLES,
        "keywords": list(KEYWORDS), "other_words": list(OTHER_WORDS),
        "validation_percent": VALIDATION_PERCENT, "testing_percent": TESTING_PERCENT,
        "split_rule": "speech_commands.which_set (TensorFlow's _nohash_ rule) on the speaker id",
        "splits": splits, "clips": len(rows),
        "background_noise": [f"{n}.wav" for n in BACKGROUND_NOISES],
        "accents": list(ACCENTS), "variants": [""] + variants,
        "content_sha1": content.hexdigest(),
    }
    tmp = root / (_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, root / _MANIFEST)  # written last: its presence means "complete"


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    path.write_text(buf.getvalue())


def _install(tmp: Path, out_dir: Path, config: dict) -> None:
    """Rename the finished corpus into place, replacing an empty or damaged one of ours."""
    stale = None
    if out_dir.exists():
        manifest = _read_manifest(out_dir)
        if manifest is not None:  # another process finished first
            if {k: manifest.get(k) for k in config} == config:
                return
            raise ValueError(f"out_dir={str(out_dir)!r} was filled by another generation "
                             f"with different arguments while this one ran")
        stale = out_dir.parent / f".{out_dir.name}.stale-{os.getpid()}"
        os.replace(out_dir, stale)
    os.replace(tmp, out_dir)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)
