"""Object storage (GCS, or fake-gcs-server locally) behind a few small functions.

``gs://bucket/path`` URIs everywhere. Locally ``STORAGE_EMULATOR_HOST`` points the official client at fake-gcs-server,
which enforces preconditions, so the create-only and compare-and-set writes of the run ledger behave as on GCS.
Inside a Vertex job the same URIs work whether or not ``/gcs/`` is mounted, because we always go through the client.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from google.api_core import exceptions as gexc

from embedpipe.config import Platform
from embedpipe.gcp.retries import transient

log = logging.getLogger(__name__)


class PreconditionFailed(Exception):
    """A create-only or compare-and-set write lost the race: someone else wrote first."""


def split_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("gs://"):
        raise ValueError(f"not a gs:// URI: {uri!r}")
    bucket, _, name = uri[5:].partition("/")
    return bucket, name


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


@functools.lru_cache(maxsize=4)
def _client(emulator: str | None, project: str | None):
    from google.cloud import storage

    if emulator:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=project or "embedpipe-local", credentials=AnonymousCredentials())
    return storage.Client(project=project)


def client():
    env = Platform.from_env()
    return _client(env.storage_emulator_host or None, env.google_cloud_project or None)


def blob(uri: str):
    bucket, name = split_uri(uri)
    return client().bucket(bucket).blob(name)


def ensure_bucket(name: str) -> None:
    try:
        client().create_bucket(name)
    except gexc.Conflict:
        pass


@transient
def read_bytes(uri: str, generation: int | None = None) -> bytes:
    """The object's bytes; with ``generation``, that version's (NotFound once it is replaced or deleted)."""
    bucket, name = split_uri(uri)
    return client().bucket(bucket).blob(name, generation=generation).download_as_bytes()


@transient
def read_json_gen(uri: str) -> tuple[Any, int]:
    """The JSON document at ``uri`` and its generation, or ``(None, 0)`` when absent (0 = "create only")."""
    b = blob(uri)
    try:
        data = b.download_as_bytes()
    except gexc.NotFound:
        return None, 0
    return json.loads(data), int(b.generation)


def read_json(uri: str) -> Any:
    return read_json_gen(uri)[0]


@transient
def write_bytes(
    uri: str, data: bytes, content_type: str = "application/octet-stream", if_generation_match: int | None = None
) -> int:
    """Write ``data``; with ``if_generation_match`` (0 = must not exist) raise PreconditionFailed on a lost race."""
    b = blob(uri)
    try:
        b.upload_from_string(data, content_type=content_type, if_generation_match=if_generation_match)
    except gexc.PreconditionFailed as exc:
        raise PreconditionFailed(uri) from exc
    return int(b.generation or 0)


def write_json(uri: str, obj: Any, if_generation_match: int | None = None) -> int:
    data = json.dumps(obj, indent=1, sort_keys=True).encode()
    return write_bytes(uri, data, "application/json", if_generation_match)


@transient
def delete(uri: str) -> None:
    try:
        blob(uri).delete()
    except gexc.NotFound:
        pass


@transient
def exists(uri: str) -> bool:
    return blob(uri).exists()


def list_uris(prefix_uri: str) -> Iterator[tuple[str, int]]:
    """(uri, generation) for every object under a prefix."""
    bucket, prefix = split_uri(prefix_uri)
    for b in client().list_blobs(bucket, prefix=prefix):
        yield f"gs://{bucket}/{b.name}", int(b.generation)


def has_objects(prefix_uri: str) -> bool:
    """Whether any object's name starts with the prefix (one listing call of one result)."""
    bucket, prefix = split_uri(prefix_uri)
    return any(True for _ in client().list_blobs(bucket, prefix=prefix, max_results=1))


def list_objects(prefix_uri: str) -> Iterator[tuple[str, int, int, str | None]]:
    """(uri, generation, stored size in bytes, Content-Encoding or None) for every object under a prefix."""
    bucket, prefix = split_uri(prefix_uri)
    for b in client().list_blobs(bucket, prefix=prefix):
        yield f"gs://{bucket}/{b.name}", int(b.generation), int(b.size), getattr(b, "content_encoding", None)


# Ranged reads fetch at least this much (a Parquet reader asks for column chunks, mostly in file order); resumable
# writes send this much per request (a multiple of 256 KiB). Either is what a stream holds in memory.
READ_CHUNK = 1 << 20
WRITE_CHUNK = 8 << 20


@transient
def open_read(uri: str, chunk_size: int = READ_CHUNK) -> BinaryIO:
    """A seekable binary file over the object: every read is a ranged download, so memory is what the reader asks
    for, never the object (Cloud Run's /tmp is memory too). The reads ask for the generation current at opening: on
    GCS an overwrite meanwhile fails them (NotFound) rather than mixing two versions. NotFound when absent."""
    b = blob(uri)
    b.reload()  # size and generation: the ranged reads then ask for this version
    return b.open("rb", chunk_size=chunk_size)


@contextlib.contextmanager
def open_write(
    uri: str, content_type: str = "application/octet-stream", chunk_size: int = WRITE_CHUNK
) -> Iterator[BinaryIO]:
    """A binary file that streams to the object (a resumable upload, ``chunk_size`` bytes a request). The object
    appears, whole, when the block ends; an error inside it commits nothing."""
    f = blob(uri).open("wb", chunk_size=chunk_size, ignore_flush=True, content_type=content_type)
    try:
        yield f
    except BaseException:
        # Cancel the upload: closing the writer, or its finalizer, would commit the part written so far as the
        # object. ``terminate`` also closes the buffer, so nothing is committed even if the cancel request fails.
        try:
            f.terminate()
        except Exception:  # noqa: BLE001 - an unfinished upload expires by itself; the original error matters
            log.warning("could not cancel the upload to %s", uri, exc_info=True)
            f._buffer.close()
        raise
    f.close()


@transient
def upload_file(path: Path, uri: str) -> int:
    b = blob(uri)
    b.upload_from_filename(str(path))
    return int(b.generation)


def upload_dir(local: Path, uri: str) -> list[str]:
    out = []
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            target = join(uri, path.relative_to(local).as_posix())
            upload_file(path, target)
            out.append(target)
    return out


def _local_path(local: Path, rel: str, obj: str) -> Path:
    """Where object ``obj`` (``rel`` under the prefix) lands in ``local``; ValueError when it would land elsewhere.

    Object names are whatever the bucket's writer chose (a ``base_model=gs://...`` override can name any bucket):
    ``../``, ``/abs`` or ``a//b`` must not write outside ``local`` or alias another file."""
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"refusing to download {obj}: its name {rel!r} is not a plain relative path")
    root = local.resolve()
    dest = (root / rel).resolve()
    if not dest.is_relative_to(root):  # e.g. through a symlink already in local
        raise ValueError(f"refusing to download {obj}: it would be written outside {local}")
    return dest


def download_dir(uri: str, local: Path) -> Path:
    local = Path(local)
    prefix = uri.rstrip("/") + "/"
    # every name is checked before anything is written: a hostile prefix leaves no partial download behind
    todo = [
        (obj, _local_path(local, obj[len(prefix) :], obj))
        for obj, _ in list_uris(prefix)
        if obj[len(prefix) :] and not obj.endswith("/")  # "folder/" placeholder objects hold nothing
    ]
    if not todo:
        raise FileNotFoundError(f"nothing under {uri}")
    for obj, dest in todo:
        dest.parent.mkdir(parents=True, exist_ok=True)
        blob(obj).download_to_filename(str(dest))
    return local
