"""Object storage for input and result images: a local directory or S3 (boto3).

``file:///path`` keeps objects as files (writes are atomic: temp file + rename);
``s3://bucket[/prefix]`` talks to AWS S3 or any S3-compatible store (MinIO, SeaweedFS) through
boto3, with credentials and region from the standard AWS settings and an optional endpoint.
Missing objects raise :class:`ObjectNotFound`; an unreachable store raises
:class:`StorageUnavailable` and a full one :class:`StorageFull` (the API answers 503; workers
wait, then retry). ``get`` reads a whole object (the worker's
inputs); ``open`` streams one in chunks, so serving a result never holds it in memory. No FastAPI here.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, Protocol, TypeVar
from urllib.parse import unquote, urlparse

T = TypeVar("T")


class StorageError(RuntimeError):
    pass


class StorageUnavailable(StorageError):
    """The store cannot be reached or refused the request for reasons other than a missing key."""


class StorageFull(StorageUnavailable):
    """The store refused a write for lack of space or quota: storage trouble, not a bug of the job."""


class ObjectNotFound(StorageError, KeyError):
    pass


#: local write errors that mean the disk (or the user's quota) is full
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: S3 error codes (and HTTP statuses) of a store that is full or over quota: AWS/Ceph, MinIO, HTTP 507
_S3_FULL_CODES = frozenset(
    {"QuotaExceeded", "InsufficientStorage", "XMinioStorageFull", "XMinioAdminBucketQuotaExceeded", "507"}
)


#: bytes per chunk when streaming an object out
CHUNK_BYTES = 256 * 1024


@dataclass
class StoredObject:
    """An object opened for reading: its size in bytes (``None`` if the store did not say) and its
    content as chunks. Iterate ``chunks`` once; the file or connection closes when it ends."""

    size: int | None
    chunks: Iterator[bytes]


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...
    def get(self, key: str) -> bytes: ...
    def open(self, key: str) -> StoredObject: ...
    def delete(self, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def presigned_url(self, key: str, expires_s: int) -> str | None: ...
    def ping(self) -> None: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key {key!r}")
    return key


class LocalStorage:
    """Objects as files under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        except OSError as exc:
            if (trouble := _storage_trouble(exc, key)) is None:
                raise
            raise trouble from exc
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if (trouble := _storage_trouble(exc, key)) is None:
                raise
            raise trouble from exc

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def open(self, key: str) -> StoredObject:
        try:
            handle = self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(key) from None
        return StoredObject(size=os.fstat(handle.fileno()).st_size, chunks=_file_chunks(handle))

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        for parent in path.parents:  # tidy empty job folders
            if parent == self.root or not parent.is_relative_to(self.root):
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        return None  # served by the API itself

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StorageUnavailable(f"local storage {self.root} is not writable")


def _storage_trouble(exc: BaseException, key: str) -> StorageUnavailable | None:
    """A failed local write as storage trouble when the disk is full or read-only; None otherwise."""
    errno_ = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if errno_ in _FULL_ERRNOS:
        return StorageFull(f"local storage is full writing {key!r}: {os.strerror(errno_)}")
    if errno_ == errno.EROFS:
        return StorageUnavailable(f"local storage is read-only writing {key!r}")
    return None


AddressingStyle = Literal["auto", "path", "virtual"]


class S3Storage:
    """Objects in an S3 bucket (optionally under a key prefix).

    Requests are always signed with SigV4: boto3 would otherwise presign with SigV2 in
    us-east-1, which buckets created since 2020 reject. Result links are signed for
    ``public_endpoint_url`` when given — the address clients reach the store at (e.g.
    ``http://localhost:9000`` for a Compose MinIO), which differs from the one the service
    uses inside its network (``http://minio:9000``); SigV4 signs the host, so a link cannot
    simply be rewritten afterwards. ``addressing_style``: ``path`` for most self-hosted stores,
    ``virtual`` for AWS buckets with dots-free names, ``auto`` lets botocore choose.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        public_endpoint_url: str | None = None,
        addressing_style: AddressingStyle = "auto",
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config = Config(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=3,
            read_timeout=30,
            signature_version="s3v4",
            s3={"addressing_style": addressing_style},
        )
        # A session of its own: boto3's default session resolves credentials once per process and
        # keeps them, so a store configured later (other credentials in the environment) would
        # be signed for with stale ones.
        session = boto3.session.Session()
        self.client = session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        # Presigning makes no request: a second client only decides which host the links name.
        self.link_client = (
            session.client("s3", endpoint_url=public_endpoint_url, region_name=region, config=config)
            if public_endpoint_url
            else self.client
        )

    def _key(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, method: str, key: str | None = None, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(key or "") from None
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _S3_FULL_CODES or status == "507":
                raise StorageFull(f"S3 {method} refused: {code or status}, the store is full") from None
            raise StorageUnavailable(f"S3 {method} failed: {code or exc}") from None
        except BotoCoreError as exc:
            raise StorageUnavailable(f"S3 unreachable: {exc}") from None

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._call("put_object", key, Key=self._key(key), Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError

        response = self._call("get_object", key, Key=self._key(key))
        try:
            return response["Body"].read()
        except BotoCoreError as exc:
            raise StorageUnavailable(f"S3 read failed: {exc}") from None

    def open(self, key: str) -> StoredObject:
        response = self._call("get_object", key, Key=self._key(key))
        size = response.get("ContentLength")
        return StoredObject(size=int(size) if size is not None else None, chunks=_s3_chunks(response["Body"]))

    def delete(self, key: str) -> None:
        self._call("delete_object", key, Key=self._key(key))

    def exists(self, key: str) -> bool:
        try:
            self._call("head_object", key, Key=self._key(key))
            return True
        except ObjectNotFound:
            return False

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        return self.link_client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_s
        )

    def ping(self) -> None:
        try:
            self._call("head_bucket")
        except ObjectNotFound:
            raise StorageUnavailable(f"S3 bucket {self.bucket!r} does not exist") from None


class PatientStorage:
    """A store whose reads and writes wait out a short outage instead of failing at once.

    For workers: a job that has already spent GPU time on its result should not fail because
    the object store restarted for a few seconds (a SeaweedFS or MinIO restart takes 10-20 s).
    Calls that raise :class:`StorageUnavailable` are retried with exponential back-off until
    ``patience_s`` has passed, then the last error is raised (the job's own retry policy takes
    over). Missing keys and invalid keys are not retried. The API does not use it: a request
    should get its 503 now, not hang.
    """

    def __init__(
        self,
        inner: Storage,
        patience_s: float = 45.0,
        first_wait_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.inner, self.patience_s, self.first_wait_s, self._sleep = inner, patience_s, first_wait_s, sleep

    def _retry(self, call: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.patience_s
        wait = self.first_wait_s
        while True:
            try:
                return call()
            except StorageUnavailable:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                self._sleep(min(wait, left))
                wait = min(wait * 2, 8.0)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._retry(lambda: self.inner.put(key, data, content_type))

    def get(self, key: str) -> bytes:
        return self._retry(lambda: self.inner.get(key))

    def open(self, key: str) -> StoredObject:
        return self._retry(lambda: self.inner.open(key))

    def delete(self, key: str) -> None:
        self._retry(lambda: self.inner.delete(key))

    def exists(self, key: str) -> bool:
        return self._retry(lambda: self.inner.exists(key))

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        return self.inner.presigned_url(key, expires_s)

    def ping(self) -> None:
        self.inner.ping()


def _file_chunks(handle: IO[bytes]) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk


def _s3_chunks(body: Any) -> Iterator[bytes]:
    """A botocore ``StreamingBody`` in chunks; a broken connection is :class:`StorageUnavailable`."""
    from botocore.exceptions import BotoCoreError

    try:
        yield from body.iter_chunks(CHUNK_BYTES)
    except BotoCoreError as exc:
        raise StorageUnavailable(f"S3 read failed: {exc}") from None
    finally:
        body.close()


def storage_from_url(
    url: str,
    endpoint_url: str | None = None,
    region: str | None = None,
    public_endpoint_url: str | None = None,
    addressing_style: AddressingStyle = "auto",
) -> Storage:
    """``file:///abs/path`` → :class:`LocalStorage`; ``s3://bucket/prefix`` → :class:`S3Storage`."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStorage(unquote(parsed.path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"storage URL {url!r} names no bucket")
        return S3Storage(
            parsed.netloc,
            parsed.path,
            endpoint_url=endpoint_url,
            region=region,
            public_endpoint_url=public_endpoint_url,
            addressing_style=addressing_style,
        )
    raise ValueError(f"unsupported storage URL {url!r}: use file:///path or s3://bucket[/prefix]")
