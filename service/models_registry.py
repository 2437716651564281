"""Which models the workers serve, as they announce it: what ``GET /v1/models`` and ``/readyz`` show.

The API never loads a model (no torch), so it learns what a model name stands for from the
workers that serve it. A ready worker writes, every few seconds (``WorkerRuntime.start_background``):

* ``megasr:model:<name>:info``: its :class:`~service.contracts.ModelInfo` as JSON (family,
  weights, whether trained…), kept :data:`INFO_TTL_S` after the last announcement, so a model
  whose workers are all gone still says what it was;
* ``megasr:model:<name>:workers``: a sorted set of worker names scored by when their
  announcement expires (:data:`ANNOUNCE_TTL_S` ahead). Readers count only unexpired members,
  so a SIGKILLed worker drops out by itself; a stopping one removes itself (:func:`withdraw`).

Scores are Redis's clock (``TIME``), not the machines', so skewed clocks cannot hide or keep
a worker. Reads name their keys (two round trips for any number of models): never SCAN or
KEYS over a database of job records. When workers of one name serve different weights (a
rolling upgrade), the last to announce is shown.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from redis.client import Pipeline

from .contracts import ModelInfo

#: seconds a worker's announcement counts (it is renewed every few seconds)
ANNOUNCE_TTL_S = 30
#: seconds a model's description outlives its last announcement
INFO_TTL_S = 7 * 24 * 3600


def info_key(name: str) -> str:
    return f"megasr:model:{name}:info"


def workers_key(name: str) -> str:
    return f"megasr:model:{name}:workers"


def _server_time(client: redis.Redis | Pipeline) -> float:
    seconds, microseconds = client.time()
    return seconds + microseconds / 1e6


def announce(client: redis.Redis, info: ModelInfo, worker: str, ttl_s: float = ANNOUNCE_TTL_S) -> None:
    """``worker`` serves ``info`` for the next ``ttl_s`` seconds (call again well before then)."""
    now = _server_time(client)
    with client.pipeline() as pipe:
        pipe.set(info_key(info.name), info.model_dump_json(), ex=INFO_TTL_S)
        pipe.zremrangebyscore(workers_key(info.name), "-inf", now)  # the expired ones, whoever they were
        pipe.zadd(workers_key(info.name), {worker: now + ttl_s})
        pipe.expire(workers_key(info.name), int(ttl_s) + 60)
        pipe.execute()


def withdraw(client: redis.Redis, name: str, worker: str) -> None:
    """``worker`` stops serving ``name`` (its description stays)."""
    client.zrem(workers_key(name), worker)


@dataclass(frozen=True)
class Announced:
    """What the workers say about one model name: its description (None until one announced)
    and how many workers serve it now."""

    name: str
    info: ModelInfo | None
    workers: int


def read(client: redis.Redis, names: list[str]) -> list[Announced]:
    """The announcements of ``names``, in that order."""
    if not names:
        return []
    now = _server_time(client)
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.get(info_key(name))
            pipe.zcount(workers_key(name), f"({now}", "+inf")
        answers = pipe.execute()
    found = []
    for index, name in enumerate(names):
        raw, workers = answers[2 * index], answers[2 * index + 1]
        found.append(Announced(name, _parse(raw), int(workers)))
    return found


def _parse(raw: bytes | None) -> ModelInfo | None:
    if raw is None:
        return None
    try:
        return ModelInfo.model_validate_json(raw)
    except ValueError:  # written by another version: unknown, not an error page
        return None
