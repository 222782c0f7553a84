"""The owner of the channel pt:tier:deleted (pub/sub, not a key): the GC's sweep names the
blobs it deleted from the store, and every node's local tier (store/tier.py) drops its copy
at once, without waiting for its LRU. A node that was not listening (restarting, Redis
away) compares its tier with the bucket once it listens again, and until then the check on
serve covers it: a copy is only served after the store said it has the blob
(pullthrough/tiering.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from registry.coordination.keys import PREFIX

log = logging.getLogger(__name__)

CHANNEL = f"{PREFIX}tier:deleted"
# Digests per message (one message per sweep unless it deleted more).
BATCH = 500


class TierNews:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def deleted(self, digests: list[str]) -> None:
        """Tell every node's tier that these blobs are gone from the store."""
        for at in range(0, len(digests), BATCH):
            self.redis.publish(CHANNEL, " ".join(digests[at : at + BATCH]))

    def listen(
        self,
        on_deleted: Callable[[list[str]], None],
        on_subscribed: Callable[[], None] = lambda: None,
        *,
        retry: float = 2.0,
    ) -> None:
        """Call on_deleted with each message's digests, forever; after a Redis failure,
        subscribe again. What was published while not subscribed is missed: on_subscribed
        runs after each subscription (a comparison with the bucket), and the check on
        serve covers what is asked for before it ends."""
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(CHANNEL)
                on_subscribed()
                while True:
                    # A short wait rather than listen(): the client's socket timeout would
                    # end a blocking read on a quiet channel.
                    message = pubsub.get_message(timeout=1.0)
                    data = message.get("data") if message else None
                    if isinstance(data, bytes):
                        on_deleted(data.decode().split())
            except redis.RedisError as exc:
                log.info("local tier: listening for deletions failed (%s); again soon", exc)
            except Exception:
                log.exception("local tier: a deletion could not be applied")
            finally:
                pubsub.close()
            time.sleep(retry)
