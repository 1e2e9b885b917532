"""Download and unpack the public dataset archives (where the network allows).

``download(name)`` streams the archive with a progress bar, computes its SHA-256 while it
arrives, checks it against ``sha256=`` when given (the digest of a first download is
recorded in ``SOURCE.json``, so later downloads can be checked against it), unpacks into a
temporary folder beside the target and renames it into place only when everything
succeeded: an interrupted download leaves no half-written dataset.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from . import data_home
from .fsdd import URL as FSDD_REPO
from .har import URL as UCI_HAR_URL
from .speech_commands import URLS as SPEECH_COMMANDS_URLS

#: name -> (archive URL, folder under the data home the loader expects)
ARCHIVES = {
    "speech_commands_v0.01": (SPEECH_COMMANDS_URLS["v0.01"], "speech_commands_v0.01"),
    "speech_commands_v0.02": (SPEECH_COMMANDS_URLS["v0.02"], "speech_commands_v0.02"),
    "uci_har": (UCI_HAR_URL, "uci_har"),
    "fsdd": (FSDD_REPO + "/archive/refs/heads/master.zip", "fsdd"),
}


def _fetch(url: str, dest: Path, *, progress: bool) -> str:
    """Stream ``url`` into ``dest``; return the SHA-256 hex digest of the bytes."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url) as response, open(dest, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name, disable=not progress) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()


def _unpack(archive: Path, into: Path) -> None:
    """Unpack a .zip or a tar archive, refusing members that would land outside ``into``."""
    into = into.resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
            _check_members(archive, names, into)
            z.extractall(into)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            _check_members(archive, t.getnames(), into)
            t.extractall(into, filter="data")
    else:
        raise ValueError(f"{archive}: not a zip or tar archive")


def _check_members(archive: Path, names, into: Path) -> None:
    for name in names:
        if not (into / name).resolve().is_relative_to(into):
            raise ValueError(f"{archive}: member {name!r} would unpack outside {into}")


def download(name: str, out_dir=None, *, url: str | None = None, sha256: str | None = None,
             progress: bool = True) -> Path:
    """Download dataset ``name`` (one of :data:`ARCHIVES`) and unpack it.

    Args:
        name: ``speech_commands_v0.01 | speech_commands_v0.02 | uci_har | fsdd``.
        out_dir: target folder (default: ``data_home() / <the loader's folder>``).
        url: another address for the same archive (a mirror, or a local ``file://`` copy).
        sha256: expected SHA-256 of the archive; a mismatch raises and writes nothing.
        progress: show a progress bar.

    Returns:
        the target folder; it also holds ``SOURCE.json`` (URL and SHA-256).

    Raises:
        ValueError: unknown ``name``, a checksum mismatch, or an unsafe or unknown archive.
        FileExistsError: the target folder exists already (nothing is overwritten).
        OSError: the network or the file system failed (nothing is left behind).
    """
    if name not in ARCHIVES:
        raise ValueError(f"dataset {name!r} has no download; expected one of {', '.join(ARCHIVES)}")
    default_url, folder = ARCHIVES[name]
    url = url or default_url
    target = Path(out_dir) if out_dir is not None else data_home() / folder
    if target.exists():
        raise FileExistsError(f"{target} exists already; remove it or pass another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        archive = work / "archive"
        digest = _fetch(url, archive, progress=progress)
        if sha256 is not None and digest != sha256.lower():
            raise ValueError(f"{url}: SHA-256 is {digest}, expected {sha256}; the archive was discarded")
        unpacked = work / "unpacked"
        _unpack(archive, unpacked)
        entries = list(unpacked.iterdir())
        if len(entries) == 1 and entries[0].is_dir():  # e.g. GitHub's repo-master/ wrapper
            unpacked = entries[0]
        (unpacked / "SOURCE.json").write_text(json.dumps({"url": url, "sha256": digest}, indent=2) + "\n")
        unpacked.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
