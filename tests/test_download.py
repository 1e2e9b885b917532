"""`str-rnn data download`: streamed, checksummed, unpacked atomically (file:// archives made here)."""
import hashlib
import io
import json
import tarfile
import zipfile

import pytest

from str_rnn.cli import main
from str_rnn.datasets.download import download


def _tarball(path, files):
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def test_tar_archive_is_unpacked_with_its_digest_recorded(tmp_path):
    archive = _tarball(tmp_path / "sc.tar.gz", {"yes/a_nohash_0.wav": b"RIFF", "testing_list.txt": b"yes/a\n"})
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    out = download("speech_commands_v0.01", tmp_path / "sc", url=archive.as_uri(), sha256=digest, progress=False)
    assert (out / "yes" / "a_nohash_0.wav").read_bytes() == b"RIFF"
    assert json.loads((out / "SOURCE.json").read_text())["sha256"] == digest
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_single_top_folder_of_a_zip_is_hoisted(tmp_path):
    archive = tmp_path / "fsdd.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("free-spoken-digit-dataset-master/recordings/0_george_0.wav", b"RIFF")
    out = download("fsdd", tmp_path / "fsdd", url=archive.as_uri(), progress=False)
    assert (out / "recordings" / "0_george_0.wav").is_file()


def test_checksum_mismatch_writes_nothing(tmp_path):
    archive = _tarball(tmp_path / "a.tar.gz", {"x.txt": b"1"})
    with pytest.raises(ValueError, match="SHA-256"):
        download("uci_har", tmp_path / "har", url=archive.as_uri(), sha256="0" * 64, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz"]


def test_unsafe_member_and_existing_target_are_refused(tmp_path):
    archive = _tarball(tmp_path / "evil.tar.gz", {"../escape.txt": b"x"})
    with pytest.raises(ValueError, match="outside"):
        download("uci_har", tmp_path / "har", url=archive.as_uri(), progress=False)
    (tmp_path / "here").mkdir()
    with pytest.raises(FileExistsError, match="exists already"):
        download("uci_har", tmp_path / "here", url=archive.as_uri(), progress=False)


def test_cli_download_names_an_unknown_dataset(capsys):
    assert main(["data", "download", "imagenet"]) == 2
    assert "imagenet" in capsys.readouterr().err
