"""A small ctypes binding to libespeak-ng, as shipped by the PyPI package ``espeakng-loader``.

Only what a speech-corpus generator needs: list the voices and voice variants, and speak
a text into a NumPy array of 16-bit samples at the library's own rate (22,050 Hz)::

    with Espeak() as tts:
        samples = tts.synth("yes", voice="en-GB-scotland", variant="f2", rate=160)

Why each :class:`Espeak` loads its own copy of the library: libespeak-ng keeps synthesis
state in C globals that no API call resets (the pitch-flutter phase, the automatic gain
control, the harmonic spectra it interpolates from), so the same text in the same voice
gives different samples depending on what was spoken before — even after
``espeak_Terminate`` + ``espeak_Initialize``. An instance therefore ``dlopen``\\ s a private
copy of the shared library (private, so that no other user of espeak in the process can
hold it loaded) and ``dlclose``\\ s it on :meth:`Espeak.close`; the next instance starts
from the library's pristine static data. Every :meth:`Espeak.synth` also seeds espeak's
random generator and the C library's ``rand()`` (Klatt voices with breath draw from it).
The output of an instance is then a pure function of the calls made on it, which is what
makes a generated corpus reproducible.

Known limit (libespeak-ng 1.52): a low ``pitch`` with a wide ``pitch_range`` on a
low-voiced variant (``rob``, ``Demonic``, ``Annie``) crashes the library (segfault);
:mod:`str_rnn.datasets.synth_kws` keeps its draws inside tested bounds.
"""
from __future__ import annotations

import atexit
import ctypes
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Espeak", "EspeakError", "Voice", "is_available", "SAMPLE_RATE"]

#: Sample rate of every bundled (non-MBROLA) espeak-ng voice.
SAMPLE_RATE = 22050

# speak_lib.h constants.
_AUDIO_OUTPUT_SYNCHRONOUS = 2  # synthesise inside espeak_Synth, samples go to the callback
_INITIALIZE_DONT_EXIT = 0x8000  # return an error instead of calling exit()
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAMS = {"rate": 1, "volume": 2, "pitch": 3, "range": 4, "wordgap": 7}
# Parameter limits documented in speak_lib.h (rate in words per minute).
_LIMITS = {"rate": (80, 450), "volume": (0, 200), "pitch": (0, 99), "range": (0, 99),
           "wordgap": (0, 1000)}

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakError(RuntimeError):
    """libespeak-ng is missing or returned an error."""


class _VoiceStruct(ctypes.Structure):
    # espeak_VOICE from speak_lib.h
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),  # (priority byte, NUL-terminated string) pairs
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


@dataclass(frozen=True)
class Voice:
    """One entry of ``espeak_ListVoices``.

    Attributes:
        name: display name, e.g. ``"English (Scotland)"``.
        identifier: file below ``espeak-ng-data``, e.g. ``"gmw/en-GB-scotland"``; its last
            component (``"en-GB-scotland"``) is what :meth:`Espeak.synth` takes as ``voice``.
        language: the voice's first (preferred) language code, e.g. ``"en-gb-scotland"``.
        gender: ``"male"``, ``"female"`` or ``""``.
    """

    name: str
    identifier: str
    language: str
    gender: str

    @property
    def key(self) -> str:
        """The name to pass to :meth:`Espeak.synth` (``voice=`` or ``variant=``)."""
        return self.identifier.rsplit("/", 1)[-1]


def _loader():
    try:
        import espeakng_loader
    except ImportError as e:  # pragma: no cover - exercised only without the package
        raise EspeakError(
            "espeak-ng is not installed: pip install espeakng-loader "
            "(or pip install 'str_rnn[audio]')") from e
    return espeakng_loader


def is_available() -> bool:
    """True when ``espeakng-loader`` is importable and its library file exists."""
    try:
        return Path(_loader().get_library_path()).is_file()
    except EspeakError:
        return False


def package_version() -> str:
    """Version of the ``espeakng-loader`` distribution (it pins the library and its data)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("espeakng-loader")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


_open_lock = threading.Lock()  # one open instance per process (the library is global state)


def _load_private_copy() -> ctypes.CDLL:
    """dlopen a fresh private copy of the library, so that its state is ours alone.

    The copy is deleted right after loading where the OS allows it (a loaded file stays
    mapped on POSIX), so nothing is left in the temp folder even if the process is killed.
    """
    src = Path(_loader().get_library_path())
    if not src.is_file():
        raise EspeakError(f"libespeak-ng not found at {src}")
    tmp = Path(tempfile.mkdtemp(prefix="str_rnn_espeak_"))
    copy = tmp / src.name
    shutil.copyfile(src, copy)
    try:
        return ctypes.CDLL(str(copy), mode=getattr(ctypes, "RTLD_LOCAL", 0))
    finally:
        if sys.platform == "win32":  # pragma: no cover - a loaded DLL cannot be deleted
            atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _dlclose(handle: int) -> None:
    import _ctypes

    if sys.platform == "win32":  # pragma: no cover
        _ctypes.FreeLibrary(handle)
    else:
        _ctypes.dlclose(handle)


class Espeak:
    """A freshly loaded, initialised libespeak-ng in synchronous mode.

    Use as a context manager (or call :meth:`close`). Only one instance can be open in a
    process at a time; a second one raises :class:`EspeakError` instead of silently
    sharing (and perturbing) the first one's state.

    Raises:
        EspeakError: espeakng-loader is missing, another instance is open, or
            ``espeak_Initialize`` failed.
    """

    def __init__(self) -> None:
        if not _open_lock.acquire(blocking=False):
            raise EspeakError("another Espeak instance is open in this process; close it first")
        self._lib = None
        try:
            self._open()
        except BaseException:
            _open_lock.release()
            raise

    def _open(self) -> None:
        loader = _loader()
        lib = _load_private_copy()
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Info.argtypes = [ctypes.POINTER(ctypes.c_char_p)]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = None
        lib.espeak_ListVoices.argtypes = [ctypes.POINTER(_VoiceStruct)]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_VoiceStruct))
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Terminate.restype = ctypes.c_int
        self._lib = lib
        # Some voices (Klatt with breath, e.g. the variant caleb) draw noise from the C
        # library's rand(), whose state lives in libc, not in libespeak-ng: seed it too.
        self._srand = None
        if sys.platform != "win32":
            libc = ctypes.CDLL(None)
            self._srand = libc.srand
            self._srand.argtypes = [ctypes.c_uint]
            self._srand.restype = None
        data = loader.get_data_path()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise EspeakError(f"espeak_Initialize failed (returned {rate}) with data path {data}")
        self.sample_rate: int = rate
        self.version: str = lib.espeak_Info(None).decode()
        self._chunks: list[np.ndarray] = []
        # Keep a reference: ctypes frees the trampoline when the Python object dies.
        self._callback = _SYNTH_CALLBACK(self._collect)
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, _events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue synthesis

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Terminate and unload the library; safe to call twice."""
        if self._lib is None:
            return
        lib, self._lib = self._lib, None
        try:
            lib.espeak_Terminate()
            _dlclose(lib._handle)
        finally:
            _open_lock.release()

    def __enter__(self) -> Espeak:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self):
        if self._lib is None:
            raise EspeakError("this Espeak instance is closed")
        return self._lib

    # ------------------------------------------------------------------ voices
    def list_voices(self, language: str | None = None) -> list[Voice]:
        """Voices whose preferred language starts with ``language`` (all when ``None``).

        ``language="variant"`` lists the voice *variants* (``m1``, ``f2``, ``klatt``, ...),
        which modify any voice: ``synth(..., voice="en-US", variant="f2")``.
        """
        lib = self._check_open()
        spec = None
        if language == "variant":
            spec = _VoiceStruct()
            spec.languages = ctypes.cast(ctypes.c_char_p(b"variant"), ctypes.c_void_p)
        arr = lib.espeak_ListVoices(ctypes.byref(spec) if spec is not None else None)
        out = []
        i = 0
        while arr[i]:
            v = arr[i].contents
            i += 1
            # languages: priority byte, then the NUL-terminated language code.
            lang = ctypes.string_at(v.languages + 1).decode() if v.languages else ""
            if language is not None and not lang.startswith(language.lower()):
                continue
            gender = {1: "male", 2: "female"}.get(v.gender, "")
            out.append(Voice(v.name.decode(), v.identifier.decode(), lang, gender))
        return sorted(out, key=lambda v: v.identifier)

    # ------------------------------------------------------------------ synthesis
    def synth(self, text: str, *, voice: str = "en-US", variant: str | None = None,
              rate: int = 175, pitch: int = 50, pitch_range: int = 50, volume: int = 100,
              wordgap: int = 0, seed: int = 0) -> np.ndarray:
        """Speak ``text``; return int16 samples at :attr:`sample_rate`.

        Args:
            text: UTF-8 text.
            voice: a voice key (see :meth:`list_voices`), e.g. ``"en-US"``.
            variant: a variant key (``list_voices("variant")``), e.g. ``"m3"``, or ``None``.
            rate: words per minute, 80–450 (espeak's default is 175).
            pitch: base pitch, 0–99 (default 50).
            pitch_range: pitch range, 0–99 (0 = monotone, default 50).
            volume: 0–200 (default 100).
            wordgap: extra pause between words in units of 10 ms.
            seed: seed of espeak's random generator and of the C library's ``rand()``
                (breathy and Klatt voices draw noise from them).

        Raises:
            ValueError: a parameter is out of range or the voice is unknown.
            EspeakError: synthesis failed.
        """
        lib = self._check_open()
        name = voice if not variant else f"{voice}+{variant}"
        if lib.espeak_SetVoiceByName(name.encode()) != 0:
            raise ValueError(f"voice={voice!r}, variant={variant!r}: espeak-ng does not know "
                             f"voice {name!r} (see Espeak().list_voices())")
        for key, value in (("rate", rate), ("pitch", pitch), ("range", pitch_range),
                           ("volume", volume), ("wordgap", wordgap)):
            lo, hi = _LIMITS[key]
            arg = "pitch_range" if key == "range" else key
            if not lo <= int(value) <= hi:
                raise ValueError(f"{arg}={value!r} is outside espeak-ng's range [{lo}, {hi}]")
            lib.espeak_SetParameter(_PARAMS[key], int(value), 0)
        lib.espeak_ng_SetRandSeed(int(seed) & 0x7FFFFFFF)
        if self._srand is not None:
            self._srand(int(seed) & 0x7FFFFFFF)
        self._chunks = []
        buf = text.encode("utf-8") + b"\0"
        err = lib.espeak_Synth(buf, len(buf), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != 0:
            raise EspeakError(f"espeak_Synth({text!r}, voice={name!r}) failed with code {err}")
        chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
