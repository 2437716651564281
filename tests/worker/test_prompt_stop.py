"""A stopping RQ worker does not hang on its command channel (``worker.main.PromptUnsubscribe``)."""

from __future__ import annotations

import time

import redis
from rq.worker import SimpleWorker

from worker.main import make_worker


def stop_after_a_late_unsubscribe_reply(worker) -> float:
    """Seconds ``worker.unsubscribe()`` takes when the command thread has already read the reply to
    an UNSUBSCRIBE and gone back to waiting on the channel (the race that cost up to 60 s a stop)."""
    worker.subscribe()
    time.sleep(0.5)  # the thread has read the subscribe reply and waits on the channel
    worker.pubsub.unsubscribe()
    time.sleep(0.5)  # it read the unsubscribe reply too, and waits again
    started = time.monotonic()
    worker.unsubscribe()
    return time.monotonic() - started


def test_a_worker_made_from_a_plain_rq_class_stops_within_its_read_time(db_url):
    connection = redis.Redis.from_url(db_url)
    worker = make_worker(SimpleWorker, connection, "prompt-stop")
    assert worker.pubsub_read_s == 1.0
    assert stop_after_a_late_unsubscribe_reply(worker) < 3
    assert not worker.pubsub_thread.is_alive()
