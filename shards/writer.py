"""Size-targeted WebDataset tar writer that emits a DALI index and publishes each shard only when complete.

Each shard is spooled to a temporary file (beside its destination when that is local, see
:func:`shards.storage.spool_dir`); on close its sha256 and size are computed, the tar and ``.idx`` are published
(an S3 PUT is atomic; local files are renamed into place), and a :class:`ShardInfo` is returned for the manifest.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from shards import storage
from shards.index import Member, index_text
from shards.manifest import ShardInfo, encode_runs
from shards.schema import check_key, class_label, to_bytes

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads a closed archive to a multiple of this
_USTAR_TEMPLATE = tarfile.TarInfo("x").tobuf(tarfile.USTAR_FORMAT)


def ustar_header(name: str, size: int) -> bytes:
    """The header block tarfile writes for a regular file (mode 0644, owner 0, mtime 0), made by patching
    name, size and checksum into a template: tarfile's general path costs 0.1 ms a member, and every tile of a
    slide is three members. Names of 100 bytes or more, and sizes past 8 GiB, go through tarfile itself."""
    raw = name.encode()
    if len(raw) >= 100 or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mode = size, 0o644
        return info.tobuf(tarfile.USTAR_FORMAT)
    header = bytearray(_USTAR_TEMPLATE)
    header[0:100] = raw.ljust(100, b"\0")
    header[100:108] = b"%07o\0" % 0o644
    header[124:136] = b"%011o\0" % size
    header[148:156] = b" " * 8  # the checksum counts its own field as spaces
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def shard_name(index: int) -> str:
    """``shard-000123.tar`` for ``index`` 123."""
    return f"shard-{index:06d}.tar"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    _hash_prefix(h, path, path.stat().st_size)
    return h.hexdigest()


class ShardWriter:
    """Write samples into ``<prefix>/shard-NNNNNN.tar`` files of about ``target_bytes`` each.

    Args:
        prefix: directory or ``s3://`` prefix the shards go to.
        target_bytes: a shard is closed once it reaches this size (bytes).
        start_index: number of the first shard, so re-runs produce the same names.
    """

    def __init__(self, prefix: str, target_bytes: int = 1 << 30, start_index: int = 0) -> None:
        self.prefix = prefix
        self.target_bytes = target_bytes
        self.index = start_index
        self.shards: list[ShardInfo] = []
        self._spool = storage.spool_dir(prefix)
        self._tar: BinaryIO | None = None
        self._members: list[Member] = []
        self._keys: set[str] = set()

    def _open(self) -> None:
        self._path = self._spool / (shard_name(self.index) + ".tmp")
        self._tar = open(self._path, "wb")  # noqa: SIM115 (closed per shard)
        self._members = []
        self._labels: list[int] = []
        self._count = 0

    def write(self, sample: dict[str, Any]) -> str:
        """Append one sample (``__key__`` plus components); returns the shard name it went to.

        A key may appear once per writer, so a dataset written by one writer per split has unique keys.
        """
        key = check_key(sample["__key__"])
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for ext in sorted(k for k in sample if not k.startswith("__")):
            self._add(f"{key}.{ext}", to_bytes(sample[ext]))
        self._labels.append(class_label(to_bytes(sample["cls"]) if "cls" in sample else None))
        self._count += 1
        name = shard_name(self.index)
        if self._tar.tell() >= self.target_bytes:
            self._close_shard()
        return name

    def _add(self, name: str, data: bytes) -> None:
        assert self._tar is not None
        self._tar.write(ustar_header(name, len(data)))  # one block, so the data starts at the next one
        self._members.append(Member(name, self._tar.tell(), len(data)))
        self._tar.write(data)
        self._tar.write(b"\0" * (-len(data) % TAR_BLOCK))

    def _close_shard(self) -> None:
        assert self._tar is not None
        end = self._tar.tell() + 2 * TAR_BLOCK  # the end-of-archive marker, then tarfile's record padding
        self._tar.write(b"\0" * (2 * TAR_BLOCK + -end % TAR_RECORD))
        self._tar.close()
        self._tar = None
        classes = encode_runs(self._labels)
        self.shards.append(_publish(self._path, self._members, self._count, self.prefix, _sha256(self._path), classes))
        self.index += 1

    def close(self) -> list[ShardInfo]:
        """Publish the last partial shard and return every shard written."""
        if self._tar is not None and self._count:
            self._close_shard()
        self._discard()
        return self.shards

    def _discard(self) -> None:
        """Drop the shard being written (never published) and the spool directory."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        shutil.rmtree(self._spool, ignore_errors=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # On an error the shard in progress is incomplete: it is discarded, never published.
        if exc_type is None:
            self.close()
        else:
            self._discard()


def _publish(
    tar_path: Path, members: list[Member], samples: int, prefix: str, sha256: str, classes: str | None
) -> ShardInfo:
    """Publish a finished ``shard-N.tar.tmp`` under ``prefix`` with its ``.idx`` (index first), moving both there.

    An S3 PUT is atomic and local files are renamed into place, so a shard is never seen half written.
    """
    name = tar_path.name.removesuffix(".tmp")
    idx_path = tar_path.with_name(name.replace(".tar", ".idx"))
    idx_path.write_text(index_text(members))
    info = ShardInfo(name=name, size=tar_path.stat().st_size, sha256=sha256, samples=samples, classes=classes)
    storage.move_file(idx_path, storage.join(prefix, idx_path.name))
    storage.move_file(tar_path, storage.join(prefix, name))
    return info


def concat_shards(
    parts: Iterable[tuple[Path, list[list[Member]]]], prefix: str, index: int, classes: str | None = None
) -> ShardInfo:
    """Publish ``shard-<index>`` made of whole tar ``parts`` (local files with their indexed samples), byte for byte;
    ``classes`` are its samples' class runs (the parts', joined), when known.

    Each part's members are copied without unpacking and the index offsets are shifted, so joining staged
    parts costs one sequential copy and one hash instead of re-tarring every sample. ``parts`` is consumed one
    at a time: each part file is fully read before the next is asked for.
    """
    members: list[Member] = []
    h = hashlib.sha256()
    keys: set[str] = set()
    spool = storage.spool_dir(prefix)
    hasher = ThreadPoolExecutor(1, thread_name_prefix="tessera-shard-hash")
    try:
        tar_path = spool / (shard_name(index) + ".tmp")
        with open(tar_path, "wb") as out:
            at = 0
            for path, samples in parts:
                # Members end at the last data block; what follows in a part is its end-of-archive padding.
                end = max(m.offset + m.size for sample in samples for m in sample)
                end += -end % TAR_BLOCK
                for sample in samples:
                    if sample[0].key in keys:
                        raise ValueError(f"duplicate sample key {sample[0].key!r}")
                    keys.add(sample[0].key)
                    members += [Member(m.name, m.offset + at, m.size) for m in sample]
                # The hash (one core) and the copy (in the kernel) of a part overlap; both end before the next.
                hashed = hasher.submit(_hash_prefix, h, path, end)
                with open(path, "rb") as f:
                    _copy_prefix(f, out, end, path)
                hashed.result()
                at += end
            trailer = b"\0" * (2 * TAR_BLOCK)  # the end-of-archive marker
            out.write(trailer)
            h.update(trailer)
        return _publish(tar_path, members, len(keys), prefix, h.hexdigest(), classes)
    finally:
        hasher.shutdown()
        shutil.rmtree(spool, ignore_errors=True)


def _hash_prefix(h: Any, path: Path, count: int) -> None:
    """Feed the first ``count`` bytes of ``path`` to ``h`` (hashlib lets other threads run meanwhile)."""
    with open(path, "rb") as f:
        left = count
        while left:
            chunk = f.read(min(left, 1 << 22))
            if not chunk:
                raise ValueError(f"part {path} is shorter than its index says")
            h.update(chunk)
            left -= len(chunk)


def _copy_prefix(src: BinaryIO, dst: BinaryIO, count: int, path: Path) -> None:
    """Append the first ``count`` bytes of ``src`` to ``dst``: ``copy_file_range`` in the kernel (no copies
    through Python), read and write where the file systems cannot."""
    dst.flush()
    left = count
    try:
        while left:
            n = os.copy_file_range(src.fileno(), dst.fileno(), left)
            if n == 0:
                raise ValueError(f"part {path} is shorter than its index says")
            left -= n
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        while left:  # both positions are where the kernel left them
            chunk = src.read(min(left, 1 << 22))
            if not chunk:
                raise ValueError(f"part {path} is shorter than its index says") from None
            dst.write(chunk)
            left -= len(chunk)


def read_tar_samples(path: str | Path) -> list[dict[str, bytes | str]]:
    """Read a local shard back into sample dicts (for tests, checks and small tools)."""
    return list(iter_tar_samples(path))


def iter_tar_samples(path: str | Path) -> Iterator[dict[str, bytes | str]]:
    """A local shard's samples one at a time (a sample's files are consecutive, as WebDataset has them), so a
    shard of any size is read in the memory of one sample."""
    sample: dict[str, bytes | str] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, ext = m.name.split(".", 1)
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            f = tf.extractfile(m)
            assert f is not None
            sample.setdefault("__key__", key)
            sample[ext] = f.read()
    if sample:
        yield sample
