"""download_dir writes only inside the local folder, whatever the bucket's object names say."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedpipe.gcp import storage


class _Blob:
    def __init__(self, objects: dict[str, bytes], uri: str):
        self.objects, self.uri = objects, uri

    def download_to_filename(self, path: str) -> None:
        Path(path).write_bytes(self.objects[self.uri])


@pytest.fixture
def bucket(monkeypatch):
    """A fake bucket: ``gs://`` URI -> bytes, served through ``list_uris`` and ``blob``."""
    objects: dict[str, bytes] = {}
    monkeypatch.setattr(storage, "list_uris", lambda prefix: ((u, 1) for u in sorted(objects) if u.startswith(prefix)))
    monkeypatch.setattr(storage, "blob", lambda uri: _Blob(objects, uri))
    return objects


def test_download_dir_copies_the_tree(bucket, tmp_path):
    bucket.update({"gs://b/m/config.json": b"{}", "gs://b/m/pooling/config.json": b"[]", "gs://b/m/sub/": b""})
    assert storage.download_dir("gs://b/m", tmp_path / "out") == tmp_path / "out"
    assert (tmp_path / "out" / "config.json").read_bytes() == b"{}"
    assert (tmp_path / "out" / "pooling" / "config.json").read_bytes() == b"[]"


@pytest.mark.parametrize("name", ["../escaped.txt", "a/../../escaped.txt", "{tmp}/abs.txt", "a//b", "./x"])
def test_download_dir_refuses_names_that_leave_the_folder(bucket, tmp_path, name):
    name = name.format(tmp=tmp_path)  # an absolute path: under tmp_path, so even a broken download_dir stays there
    bucket.update({"gs://b/m/config.json": b"{}", f"gs://b/m/{name}": b"pwned"})
    with pytest.raises(ValueError, match="gs://b/m/"):
        storage.download_dir("gs://b/m", tmp_path / "out" / "model")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing written, not even the good object


def test_download_dir_refuses_to_write_through_a_symlink(bucket, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    bucket["gs://b/m/link/x.bin"] = b"pwned"
    with pytest.raises(ValueError, match="outside"):
        storage.download_dir("gs://b/m", tmp_path / "out")


def test_download_dir_of_an_empty_prefix_is_not_found(bucket, tmp_path):
    with pytest.raises(FileNotFoundError):
        storage.download_dir("gs://b/m", tmp_path / "out")
