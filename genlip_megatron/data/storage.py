"""Where shards live: local paths or ``s3://bucket/key`` objects, streamed (docs/data.md).

An S3 object is read front to back with ranged GETs of ``chunk`` bytes by a background
thread that keeps at most ``read_ahead`` bytes queued (bounded memory per open shard), so a
shard is never downloaded whole and reading overlaps decoding. Each GET that fails with a
transient error (connection refused or reset, timeout, HTTP 5xx/429) is retried after
``backoff × 2^attempt`` seconds (capped at 30 s) up to ``retries`` times, resuming at the byte
where the stream stopped; after the last retry the read raises OSError, which the shard reader
turns into a counted ``shards/unreadable`` (the rest of that shard is skipped), never a crash.

Credentials and endpoint come from the standard variables, read by boto3/botocore:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (or a profile), ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` (S3-compatible stores: MinIO, Ceph, moto), ``AWS_REGION`` /
``AWS_DEFAULT_REGION``. boto3 is imported only when an ``s3://`` path is used.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import logging
import os
import posixpath
import queue
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Optional

logger = logging.getLogger(__name__)

S3_PREFIX = "s3://"
_BACKOFF_CAP_S = 30.0
_TRANSIENT_HTTP = {429, 500, 502, 503, 504}


@dataclass
class RemotePolicy:
    """Retry and read-ahead policy for object-store reads (from ``data.reader``)."""

    retries: int = 5
    backoff_s: float = 0.5
    read_ahead_bytes: int = 32 << 20
    chunk_bytes: int = 8 << 20


_policy = RemotePolicy()
_retries = 0  # transient failures retried in this process (read by the shard streams)
_clients: dict[int, object] = {}  # pid → boto3 client (a forked worker makes its own)


def configure(policy: RemotePolicy) -> None:
    """Set this process's object-store policy (the loader does so in every worker)."""
    global _policy
    _policy = policy


def take_retries() -> int:
    """Transient object-store failures retried in this process since the last call."""
    global _retries
    n, _retries = _retries, 0
    return n


def policy_of(reader) -> RemotePolicy:
    """The policy of a ``data.reader`` section (:class:`~genlip_megatron.config.data.ReaderConfig`)."""
    return RemotePolicy(retries=reader.remote_retries, backoff_s=reader.remote_backoff_s,
                        read_ahead_bytes=reader.remote_read_ahead_mib << 20)


def is_remote(url: str) -> bool:
    return str(url).startswith(S3_PREFIX)


def join(base: str, *parts: str) -> str:
    """Path join that keeps ``s3://`` URLs intact."""
    return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → (``bucket``, ``a/b``)."""
    bucket, _, key = url[len(S3_PREFIX):].partition("/")
    return bucket, key


def _client():
    pid = os.getpid()
    if pid not in _clients:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise RuntimeError("s3:// shard paths need boto3; `pip install boto3`.") from None
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") \
            or "us-east-1"
        # our retry loop owns retries (it resumes mid-object); botocore tries once
        cfg = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=5,
                     read_timeout=30, max_pool_connections=16)
        _clients[pid] = boto3.client("s3", endpoint_url=endpoint, region_name=region, config=cfg)
    return _clients[pid]


def _transient(exc: BaseException) -> bool:
    """Worth retrying: network trouble or a server-side/throttling HTTP status."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status in _TRANSIENT_HTTP
    return True  # EndpointConnectionError, ReadTimeout, ConnectionClosed, IncompleteRead ...


def _with_retries(what: str, fn):
    """``fn()`` retried with exponential back-off on transient errors."""
    global _retries
    for attempt in range(_policy.retries + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == _policy.retries or not _transient(exc):
                raise OSError(f"{what}: {type(exc).__name__}: {str(exc)[:160]}") from exc
            _retries += 1
            delay = min(_BACKOFF_CAP_S, _policy.backoff_s * 2 ** attempt)
            logger.warning("%s failed (%s); retry %d/%d in %.1f s", what, type(exc).__name__,
                           attempt + 1, _policy.retries, delay)
            time.sleep(delay)


def _get_range(url: str, start: int, end: int) -> bytes:
    """Bytes [start, end] (inclusive) of an object, retried as a whole."""
    bucket, key = split_url(url)

    def get() -> bytes:
        body = _client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end}")["Body"]
        try:
            return body.read()
        finally:
            body.close()

    return _with_retries(f"GET {url} bytes {start}-{end}", get)


class _S3Reader(io.RawIOBase):
    """Sequential reader of one object: a thread fetches chunks into a bounded queue."""

    def __init__(self, url: str, size: int) -> None:
        super().__init__()
        self.url, self.size = url, size
        self._chunks: queue.Queue = queue.Queue(
            maxsize=max(1, _policy.read_ahead_bytes // _policy.chunk_bytes))
        self._buf, self._stop = memoryview(b""), threading.Event()
        self._thread = threading.Thread(target=self._fetch, daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        pos = 0
        while pos < self.size and not self._stop.is_set():
            end = min(self.size, pos + _policy.chunk_bytes) - 1
            try:
                item: object = _get_range(self.url, pos, end)
            except OSError as exc:
                item = exc
            self._put(item)
            if isinstance(item, OSError):
                return
            pos = end + 1
        self._put(b"")

    def _put(self, item: object) -> None:
        """Queue ``item``, waiting for room unless the reader was closed."""
        while not self._stop.is_set():
            try:
                self._chunks.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if not self._buf:
            item = self._chunks.get()
            if isinstance(item, OSError):
                raise item
            self._buf = memoryview(item)
            if not item:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        self._stop.set()
        super().close()


def open_stream(url: str) -> BinaryIO:
    """A binary file object read front to back (local file, or a streamed S3 object)."""
    if not is_remote(url):
        return open(url, "rb")
    size = object_size(url)
    if size is None:
        raise FileNotFoundError(url)
    return io.BufferedReader(_S3Reader(url, size), buffer_size=1 << 20)


def object_size(url: str) -> Optional[int]:
    """Size of an S3 object, or None when the key does not exist."""
    from botocore.exceptions import ClientError

    bucket, key = split_url(url)
    try:
        head = _with_retries(f"HEAD {url}", lambda: _client().head_object(Bucket=bucket,
                                                                           Key=key))
    except OSError as exc:
        cause = exc.__cause__
        if isinstance(cause, ClientError) and \
                cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (403, 404):
            return None
        raise
    return int(head["ContentLength"])


def read_bytes(url: str) -> bytes:
    """A whole (small) file or object, e.g. a YAML index; FileNotFoundError when absent."""
    if not is_remote(url):
        with open(url, "rb") as f:
            return f.read()
    size = object_size(url)
    if size is None:
        raise FileNotFoundError(url)
    return _get_range(url, 0, max(0, size - 1)) if size else b""


def read_head(url: str, n: int) -> bytes:
    """The first ``n`` bytes (fewer when the object is shorter)."""
    if not is_remote(url):
        with open(url, "rb") as f:
            return f.read(n)
    size = object_size(url)
    if size is None:
        raise FileNotFoundError(url)
    return _get_range(url, 0, min(size, n) - 1) if size else b""


def list_objects(prefix_url: str) -> dict[str, int]:
    """``{url: size}`` of every object whose key starts with the prefix of ``prefix_url``."""
    bucket, prefix = split_url(prefix_url)
    out: dict[str, int] = {}
    token: Optional[str] = None
    while True:  # bounded by the listing itself: each page moves the continuation token on
        kwargs = {"Bucket": bucket, "Prefix": prefix}
        if token:
            kwargs["ContinuationToken"] = token
        page = _with_retries(f"LIST {prefix_url}",
                             lambda: _client().list_objects_v2(**kwargs))
        for obj in page.get("Contents", []):
            out[f"{S3_PREFIX}{bucket}/{obj['Key']}"] = int(obj["Size"])
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return out


def expand_pattern(pattern: str) -> list[str]:
    """Paths matching one glob (no braces): local files or S3 keys; a literal path is kept
    even when missing, so that the start-up check names it."""
    if not is_remote(pattern):
        hits = glob.glob(pattern)
        return hits if hits or glob.has_magic(pattern) else [pattern]
    if not glob.has_magic(pattern):
        return [pattern]
    magic = min(pattern.index(c) for c in "*?[" if c in pattern)
    listed = list_objects(pattern[:magic])
    return [u for u in listed if fnmatch.fnmatchcase(u, pattern)]
