"""The pyarrow filesystem that Ray Train and Ray Tune write checkpoints and sweep state through, for ``s3://``.

pyarrow's S3 filesystem emulates directories with empty ``dir/`` marker objects: it writes one on ``create_dir``
and after a delete empties a prefix. S3 does not need them, and S3 servers over a plain disk (``rclone serve s3``,
the local stack's) refuse them (a marker's name is an existing folder) or list them back as empty files, which
then break recursive copies. This filesystem never writes a marker: ``create_dir`` is a no-op (a prefix exists
once an object is under it) and deletes go through :mod:`shards.storage`; every other operation is pyarrow's.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs

from shards import storage


class MarkerlessS3(pafs.FileSystemHandler):
    """pyarrow's ``S3FileSystem`` without directory markers (paths are ``bucket/key``, as pyarrow's).

    Endpoint and keys come from the environment of the process using it, as for boto3 and DALI, so a copy
    pickled to a Ray worker is rebuilt there rather than carrying the driver's keys.
    """

    def __init__(self) -> None:
        self.fs = _s3()

    def __reduce__(self):
        return (MarkerlessS3, ())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MarkerlessS3) and self.fs.equals(other.fs)

    def get_type_name(self) -> str:
        return "tessera-s3"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def equals(self, other) -> bool:
        return self == other

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        """Nothing to create: S3 prefixes exist through the objects under them."""

    def delete_dir(self, path: str) -> None:
        storage.delete_tree(f"s3://{path.rstrip('/')}/")

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        storage.delete_tree(f"s3://{path.rstrip('/')}/")

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to empty every bucket of the object store")

    def delete_file(self, path: str) -> None:
        storage.delete(f"s3://{path}")

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path: str):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def _s3() -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem for the environment's endpoint and keys.

    The AWS C++ SDK under pyarrow, like boto3, must only send checksums when required to talk to non-AWS
    servers; it reads that from the environment, so the default is set there before the client exists.
    """
    for var in ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION"):
        os.environ.setdefault(var, "when_required")
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    return pafs.S3FileSystem(
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        endpoint_override=endpoint.split("://", 1)[-1] or None,
        scheme=endpoint.split("://", 1)[0] if endpoint else "https",
        region=os.environ.get("AWS_REGION", "us-east-1"),
    )


def s3_filesystem() -> pafs.FileSystem:
    """The markerless S3 filesystem for Ray Train and Ray Tune storage."""
    return pafs.PyFileSystem(MarkerlessS3())
