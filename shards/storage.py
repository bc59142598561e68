"""The one module that knows URL schemes: plain paths, ``file://`` and ``s3://``.

Nothing else in Tessera calls boto3. S3 endpoint and credentials come from the standard environment
variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``) so that
DALI's own S3 reader, MLflow and boto3 all see the same object store.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from shards import scratch, transfers

SPOOL = ".tessera-spool-"  # prefix of the folders files are built in before they are published


class StorageError(RuntimeError):
    """An object store operation failed; the message names the URL."""


class Missing(StorageError):
    """The object, file or bucket is not there (``bucket``: the bucket that does not exist, if that is why)."""

    def __init__(self, message: str, bucket: str | None = None) -> None:
        super().__init__(message)
        self.bucket = bucket


NO_OBJECT_CODES = ("404", "NoSuchKey", "NotFound")  # S3's answers for an object that is not there
MISSING_CODES = (*NO_OBJECT_CODES, "NoSuchBucket")


@dataclass(frozen=True)
class Location:
    """A parsed URL: ``scheme`` is ``file`` or ``s3``; for S3 ``bucket``/``key``, for files ``path``."""

    scheme: str
    bucket: str
    key: str

    @property
    def path(self) -> Path:
        return Path(self.key)


def parse(url: str) -> Location:
    """Split ``url`` into scheme, bucket and key; a plain path is a ``file`` location."""
    if url.startswith("s3://"):
        p = urlparse(url)
        if not p.netloc:
            raise StorageError(f"{url}: an s3:// URL needs a bucket")
        return Location("s3", p.netloc, p.path.lstrip("/"))
    if url.startswith("file://"):
        url = url[len("file://") :]
    return Location("file", "", os.path.abspath(url))


def anchored(url: str) -> str:
    """A local path made absolute against this process's working directory (a URL as it is). Paths that Ray
    workers read or write must be: a worker's working directory is its own (the node's where the cluster was
    started; Ray Train's run folder), so ``./ds`` named one place to the command and another to its workers."""
    return url if "://" in url else os.path.abspath(url)


def anchored_if_local(ref: str) -> str:
    """:func:`anchored` for a reference that is a local file or folder where one is there, and otherwise a name
    for elsewhere (a hub model's ``facebook/sam-vit-base``), left as it is."""
    return anchored(ref) if "://" not in ref and os.path.exists(ref) else ref


def join(base: str, *parts: str) -> str:
    """Join URL path parts with ``/`` (works for paths and ``s3://``)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


_CLIENT_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _client(endpoint: str | None, key: str | None, region: str, probe: bool = False):
    import boto3
    from botocore.config import Config

    # Non-AWS servers (rclone, MinIO) reject the newer default checksums; path-style for the same reason.
    cfg = Config(
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"},
        retries={"max_attempts": 1 if probe else 5, "mode": "standard"},
        connect_timeout=2 if probe else 5,
        read_timeout=5 if probe else 60,
        max_pool_connections=64,  # the samplers' ranged GETs run 32 at a time per worker (shards.sampling)
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint or None,
        aws_access_key_id=key,
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        region_name=region,
        config=cfg,
    )


def s3_client(probe: bool = False):
    """A boto3 S3 client for the endpoint and keys in the environment (cached per endpoint and key); ``probe``:
    one try within seconds, to ask whether the store answers at all."""
    with _CLIENT_LOCK:  # boto3 builds a client from its default session, which threads must not share while it does
        return _client(
            os.environ.get("AWS_ENDPOINT_URL"),
            os.environ.get("AWS_ACCESS_KEY_ID"),
            os.environ.get("AWS_REGION", "us-east-1"),
            probe,
        )


def unreachable(url: str) -> str | None:
    """Why the store holding ``url`` does not answer now, or None when it does (local paths always do).

    Tells a store's outage, which no retry of one object helps, from one object's own fault: a bucket that
    answers at all (even 403 or 404) is up; no answer, or a server error (5xx), is not.
    """
    loc = parse(url)
    if loc.scheme != "s3":
        return None
    try:
        s3_client(probe=True).head_bucket(Bucket=loc.bucket)
    except Exception as exc:
        status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status is not None and status < 500:
            return None
        return f"{type(exc).__name__}: {exc}"
    return None


def _code(exc: Exception) -> str | None:
    """The S3 error code of a boto3 ``ClientError`` (None for other errors)."""
    return getattr(exc, "response", {}).get("Error", {}).get("Code")


def _wrap(url: str, exc: Exception) -> StorageError:
    message = f"{url}: {type(exc).__name__}: {exc}"
    code = _code(exc)
    if isinstance(exc, FileNotFoundError) or code in MISSING_CODES:
        return Missing(message, parse(url).bucket if code == "NoSuchBucket" else None)
    return StorageError(message)


def put_file(local: str | Path, url: str) -> None:
    """Copy a local file to ``url``. S3 uploads are atomic: the object is visible only once complete."""
    loc = parse(url)
    try:
        if loc.scheme == "s3":
            transfers.counted(True, os.path.getsize(local), s3_client().upload_file, str(local), loc.bucket, loc.key)
        else:
            loc.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = loc.path.with_name(loc.path.name + ".partial")
            shutil.copyfile(local, tmp)
            os.replace(tmp, loc.path)
    except Exception as exc:
        raise _wrap(url, exc) from exc


def spool_dir(prefix: str) -> Path:
    """A new folder to build files in before :func:`move_file` publishes them under ``prefix``.

    For a local prefix it lies inside the prefix, on the same file system, so publishing is a rename instead of a
    second copy of every byte (staged parts, then packed shards, are the whole dataset twice); for S3 it is
    scratch in the system's temporary folder (:mod:`shards.scratch`: a killed writer's is deleted later).
    """
    loc = parse(prefix)
    if loc.scheme == "s3":
        return Path(scratch.mkdtemp("spool"))
    loc.path.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=SPOOL, dir=loc.path))


def move_file(local: str | Path, url: str) -> None:
    """Publish the finished file ``local`` at ``url`` and remove it: a rename (atomic) on the same file system,
    otherwise an upload or copy as :func:`put_file`."""
    loc = parse(url)
    if loc.scheme == "file":
        try:
            loc.path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(local, loc.path)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise _wrap(url, exc) from exc
    put_file(local, url)
    os.unlink(local)


def put_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` atomically (temporary name then rename for files)."""
    loc = parse(url)
    try:
        if loc.scheme == "s3":
            transfers.counted(True, len(data), s3_client().put_object, Bucket=loc.bucket, Key=loc.key, Body=data)
        else:
            loc.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = loc.path.with_name(loc.path.name + ".partial")
            tmp.write_bytes(data)
            os.replace(tmp, loc.path)
    except Exception as exc:
        raise _wrap(url, exc) from exc


def create_bytes(url: str, data: bytes) -> bool:
    """Write ``data`` at ``url`` only if nothing is there; False when something was.

    Exclusive on local disk (a hard link of a complete temporary file, which fails if the name exists) and on
    stores that honour S3's conditional write (``If-None-Match: *``: AWS S3, MinIO). A store that ignores the
    condition (rclone's) overwrites: a caller that needs one writer reads back what it wrote.
    """
    loc = parse(url)
    try:
        if loc.scheme == "s3":
            put = s3_client().put_object
            transfers.counted(True, len(data), put, Bucket=loc.bucket, Key=loc.key, Body=data, IfNoneMatch="*")
            return True
        loc.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=loc.path.name + ".", suffix=".partial", dir=loc.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, loc.path)
            except OSError as exc:  # a file system without hard links: an exclusive create, then the bytes
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                with open(loc.path, "xb") as f:
                    f.write(data)
        finally:
            os.unlink(tmp)
        return True
    except FileExistsError:
        return False
    except Exception as exc:
        if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return False
        raise _wrap(url, exc) from exc


def get_bytes(url: str, length: int | None = None, offset: int = 0) -> bytes:
    """Read the object at ``url``: whole, or ``length`` bytes from ``offset`` (one ranged GET on S3)."""
    loc = parse(url)
    try:
        if loc.scheme == "s3":
            extra = {"Range": f"bytes={offset}-{offset + length - 1}"} if length else {}
            get = s3_client().get_object
            return transfers.counted(False, len, lambda: get(Bucket=loc.bucket, Key=loc.key, **extra)["Body"].read())
        if length:
            with open(loc.path, "rb") as f:
                f.seek(offset)
                return f.read(length)
        return loc.path.read_bytes()
    except Exception as exc:
        raise _wrap(url, exc) from exc


def get_file(url: str, local: str | Path) -> Path:
    """Download ``url`` to ``local`` (a copy for plain files) and return the local path."""
    loc = parse(url)
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        if loc.scheme == "s3":
            get = s3_client().download_file
            transfers.counted(False, lambda _: local.stat().st_size, get, loc.bucket, loc.key, str(local))
        else:
            shutil.copyfile(loc.path, local)
    except Exception as exc:
        raise _wrap(url, exc) from exc
    return local


def exists(url: str) -> bool:
    """Whether an object exists at ``url``."""
    return stat_stamp(url) is not None


def _file_stamp(st: os.stat_result) -> str:
    return f"{st.st_size}-{st.st_mtime_ns}"


def _object_stamp(size: int, etag: str | None, modified: object) -> str:
    return f"{size}-{(etag or '').strip(chr(34)) or modified}"  # a store that gives no ETag: its modification time


def stat_stamp(url: str) -> str | None:
    """What changes when the object at ``url`` is replaced: its size and modification time (a file) or ETag (an
    object, as its listing gives it); None when absent. Cheap: no byte of the content is read."""
    loc = parse(url)
    if loc.scheme == "file":
        return _file_stamp(loc.path.stat()) if loc.path.is_file() else None
    try:
        head = s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
    except Exception as exc:
        if _code(exc) in NO_OBJECT_CODES:  # the object; "404" is also a head of a missing bucket
            return None
        raise _wrap(url, exc) from exc
    return _object_stamp(head["ContentLength"], head.get("ETag"), head.get("LastModified"))


def list_stamps(prefix: str) -> Iterator[tuple[str, str]]:
    """Every object under ``prefix`` (recursive) as ``(url, stamp)`` (see :func:`stat_stamp`), sorted for S3
    by key; one listing request per thousand objects, none per object."""
    loc = parse(prefix)
    if loc.scheme == "file":
        root = loc.path
        if root.is_file():
            yield str(root), _file_stamp(root.stat())
        elif root.is_dir():
            for path in sorted(str(p) for p in root.rglob("*")):
                try:
                    st = os.stat(path)
                except FileNotFoundError:  # removed while listed
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield path, _file_stamp(st)
        return
    try:
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.key)
        for page in transfers.listing(pages):
            for obj in page.get("Contents", []):
                stamp = _object_stamp(obj["Size"], obj.get("ETag"), obj.get("LastModified"))
                yield f"s3://{loc.bucket}/{obj['Key']}", stamp
    except Exception as exc:
        raise _wrap(prefix, exc) from exc


def list_urls(prefix: str) -> Iterator[str]:
    """Every object URL under ``prefix`` (recursive), sorted for S3 by key."""
    return (url for url, _ in list_stamps(prefix))


def delete(url: str) -> None:
    """Remove the object at ``url``; absent objects are fine."""
    delete_many([url])


def delete_many(urls: Iterable[str]) -> None:
    """Remove the objects at ``urls``; absent ones are fine. On S3 a request per 1,000 (DeleteObjects), not one
    each: a run's staging holds three objects per piece of work, tens of thousands after a long run."""
    keys: dict[str, list[str]] = {}
    for url in urls:
        if (loc := parse(url)).scheme == "s3":
            keys.setdefault(loc.bucket, []).append(loc.key)
            continue
        try:
            loc.path.unlink(missing_ok=True)
        except OSError as exc:
            raise _wrap(url, exc) from exc
    for bucket, names in keys.items():
        for start in range(0, len(names), 1000):
            batch = {"Objects": [{"Key": k} for k in names[start : start + 1000]], "Quiet": True}
            try:
                failed = s3_client().delete_objects(Bucket=bucket, Delete=batch).get("Errors")
            except Exception as exc:
                raise _wrap(f"s3://{bucket}/{names[start]}", exc) from exc
            if failed:
                first = f"s3://{bucket}/{failed[0].get('Key')}: {failed[0].get('Code')} {failed[0].get('Message')}"
                raise StorageError(f"{len(failed)} object(s) not deleted; the first: {first}")


def delete_tree(prefix: str) -> None:
    """Remove everything under ``prefix`` (a directory, or an ``s3://`` prefix taken as a folder)."""
    loc = parse(prefix)
    if loc.scheme == "file":
        shutil.rmtree(loc.path, ignore_errors=True)
        return
    delete_many(list(list_urls(prefix.rstrip("/") + "/")))


def ensure_bucket(url: str) -> None:
    """Create the bucket of an ``s3://`` URL if it does not exist (no-op for files)."""
    loc = parse(url)
    if loc.scheme != "s3":
        return
    try:
        s3_client().head_bucket(Bucket=loc.bucket)
    except Exception:
        try:
            s3_client().create_bucket(Bucket=loc.bucket)
        except Exception as exc:
            raise _wrap(url, exc) from exc
