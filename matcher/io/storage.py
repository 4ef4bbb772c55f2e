"""Resolve `file://` and `s3://` URIs to a pyarrow filesystem and a path on it."""
from __future__ import annotations

import posixpath
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from matcher.config import StorageConfig


class StorageError(RuntimeError):
    pass


def s3_filesystem(storage: StorageConfig) -> pafs.S3FileSystem:
    kwargs: dict = {"region": storage.s3_region}
    if storage.s3_endpoint:
        parsed = urlparse(storage.s3_endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StorageError(f"storage.s3_endpoint must be http(s)://host:port, got {storage.s3_endpoint!r}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    if storage.s3_access_key:
        kwargs.update(access_key=storage.s3_access_key, secret_key=storage.s3_secret_key)
    # Fail fast instead of retrying for minutes when the server is down.
    kwargs.update(connect_timeout=5, request_timeout=30,
                  retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3))
    return pafs.S3FileSystem(**kwargs)


def resolve_uri(uri: str, storage: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path) for a `file://`, `s3://` URI or a plain local path."""
    if not uri:
        raise StorageError("empty location")
    if uri.startswith("s3://") or uri.startswith("s3a://"):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StorageError(f"S3 URI has no bucket: {uri}")
        path = posixpath.join(parsed.netloc, parsed.path.lstrip("/")).rstrip("/")
        return s3_filesystem(storage), path
    if uri.startswith("file://"):
        rest = uri[len("file://"):]
        return pafs.LocalFileSystem(), str(Path(rest).resolve())
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme (use file:// or s3://): {uri}")
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://") or uri.startswith("s3a://")


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as fh:
        return fh.read()


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as fh:
        fh.write(data)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound
