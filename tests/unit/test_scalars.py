from __future__ import annotations

import pytest

from embedpipe.gcp import storage
from embedpipe.ml.scalars import ScalarLog


def test_a_gcs_log_dir_is_staged_locally_and_the_staging_folder_removed_on_close(monkeypatch):
    uploaded = []
    monkeypatch.setattr(
        storage, "upload_dir", lambda local, uri: uploaded.append(sorted(p.name for p in local.iterdir()))
    )
    monkeypatch.setattr(storage, "read_bytes", lambda uri: b"")
    log = ScalarLog("gs://logs/run-1")
    log.add("train/loss", 0.5, 1)
    log.close()
    assert uploaded and uploaded[-1], "the finished files were uploaded"
    assert not log.local.exists(), "one staging folder per training run must not pile up in /tmp"


def test_a_failed_upload_still_removes_the_staging_folder(monkeypatch):
    def fail(local, uri):
        raise OSError("bucket unreachable")

    monkeypatch.setattr(storage, "upload_dir", fail)
    monkeypatch.setattr(storage, "read_bytes", lambda uri: b"")
    log = ScalarLog("gs://logs/run-1")
    with pytest.raises(OSError):
        log.close()
    assert not log.local.exists()


def test_a_local_log_dir_is_the_users_and_stays(tmp_path):
    log = ScalarLog(str(tmp_path / "tb"))
    log.add("train/loss", 0.5, 1)
    log.close()
    assert any((tmp_path / "tb").iterdir())
