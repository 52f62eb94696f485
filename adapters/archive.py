"""The archive (docs/AUDIT.md): a content-addressed object store for ledger exports and finalized
invoice PDFs. A directory under the data folder by default (`archive/`), or an S3-compatible
bucket when BILLING_ARCHIVE_URL=s3://bucket/prefix (boto3; credentials from boto3's own chain).

An object's key is the SHA-256 of its bytes (`objects/<sha256>`), so an object cannot change
without changing its name, and writing one twice is harmless. A ref (`refs/<name>`) names the
latest manifest of something (an export of a period, the invoices of a period); a manifest is a
JSON object that names the hashes of the objects it covers, and is itself stored as an object.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

HASH_CHUNK_BYTES = 1024 * 1024
ARCHIVE_DIR = "archive"  # under the data folder, when no BILLING_ARCHIVE_URL is set


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


class ObjectStore(Protocol):
    """Where archived objects go; keys are SHA-256 hex digests of the content."""

    def put_bytes(self, data: bytes) -> str: ...

    def put_file(self, path: Path) -> str: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def set_ref(self, name: str, key: str) -> None: ...

    def ref(self, name: str) -> str | None: ...

    def describe(self) -> str: ...


def _check_key(key: str) -> str:
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(f"not an object key (a SHA-256 in lowercase hex): {key!r}")
    return key


def _check_ref(name: str) -> str:
    parts = name.split("/")
    if not name or any(p in ("", ".", "..") for p in parts) or "\\" in name:
        raise ValueError(f"not a ref name: {name!r}")
    return name


class DirectoryStore:
    """Objects as files: <root>/objects/<first two hex digits>/<sha256>, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / "objects" / key[:2] / _check_key(key)

    def _write(self, target: Path, fill: Any) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, target)
        finally:
            Path(temp).unlink(missing_ok=True)

    def put_bytes(self, data: bytes) -> str:
        key = hashlib.sha256(data).hexdigest()
        if not self.exists(key):
            self._write(self._path(key), lambda f: f.write(data))
        return key

    def put_file(self, path: Path) -> str:
        key = sha256_file(path)
        if not self.exists(key):
            def copy(f: Any) -> None:
                with path.open("rb") as src:
                    shutil.copyfileobj(src, f, HASH_CHUNK_BYTES)
            self._write(self._path(key), copy)
        return key

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def set_ref(self, name: str, key: str) -> None:
        self._write(self.root / "refs" / _check_ref(name), lambda f: f.write(_check_key(key).encode()))

    def ref(self, name: str) -> str | None:
        path = self.root / "refs" / _check_ref(name)
        return path.read_text().strip() if path.is_file() else None

    def describe(self) -> str:
        return str(self.root)


class S3Store:
    """Objects in an S3-compatible bucket under `prefix`: <prefix>/objects/<sha256>."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 client: Any = None, **client_args: Any) -> None:
        import boto3  # only when an S3 archive is configured

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url, **client_args)

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def put_bytes(self, data: bytes) -> str:
        key = hashlib.sha256(data).hexdigest()
        if not self.exists(key):
            self.client.put_object(Bucket=self.bucket, Key=self._key("objects", key), Body=data)
        return key

    def put_file(self, path: Path) -> str:
        key = sha256_file(path)
        if not self.exists(key):
            self.client.upload_file(str(path), self.bucket, self._key("objects", key))
        return key

    def get(self, key: str) -> bytes:
        body = self.client.get_object(Bucket=self.bucket, Key=self._key("objects", _check_key(key)))
        data: bytes = body["Body"].read()
        return data

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key("objects", _check_key(key)))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def set_ref(self, name: str, key: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key("refs", _check_ref(name)),
                               Body=_check_key(key).encode())

    def ref(self, name: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key("refs", _check_ref(name)))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return bytes(body["Body"].read()).decode().strip()

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def open_store(archive_url: str | None, data_dir: Path, *, endpoint_url: str | None = None
               ) -> ObjectStore:
    """The configured store: s3://bucket/prefix, else the data folder's archive directory."""
    if not archive_url:
        return DirectoryStore(data_dir / ARCHIVE_DIR)
    url = urlparse(archive_url)
    if url.scheme == "s3" and url.netloc:
        return S3Store(url.netloc, url.path, endpoint_url=endpoint_url)
    if url.scheme == "file" and url.path:
        return DirectoryStore(Path(url.path))
    raise ValueError("BILLING_ARCHIVE_URL must be s3://bucket/prefix (or file:///a/directory)")
