"""What every part of pull-through shares (base of service.py): its services, built once,
and how it asks an upstream on a client's behalf (the negative cache and the client's
upstream budget)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TypeVar

from registry.config import Settings
from registry.coordination import Coordination, missing_key
from registry.errors import (
    BlobUnknown,
    ManifestUnknown,
    RegistryError,
    TooManyRequests,
)
from registry.metrics import Metrics
from registry.names import Target, catalog_name
from registry.pullthrough.fill import BlobFiller
from registry.pullthrough.policy import SignaturePolicy
from registry.pullthrough.presence import Presence
from registry.pullthrough.referrers import ReferrersCache
from registry.pullthrough.tiering import TierServing
from registry.store import ContentStore
from registry.store.tier import LocalTier
from registry.upstream.client import UpstreamClient, UpstreamDenied

log = logging.getLogger("registry.pullthrough")

T = TypeVar("T")


class PullThroughBase:
    """The services pull-through composes: store, coordination, upstream clients, fills,
    referrers and the signature policy."""

    def __init__(
        self,
        settings: Settings,
        store: ContentStore,
        coordination: Coordination,
        upstreams: dict[str, UpstreamClient],
        *,
        clock: Callable[[], float] = time.time,
        filler: BlobFiller | None = None,
        metrics: Metrics | None = None,
        tier: LocalTier | None = None,
    ) -> None:
        self.settings = settings
        self.redirect_ttl = settings.s3.redirect_ttl if settings.s3 else 0
        self.store = store
        self.tier = tier
        self.tiering = (
            TierServing(
                store,
                tier,
                stall_timeout=settings.upstream.read_timeout + 3 * settings.upstream.lease_ttl,
                metrics=metrics,
            )
            if tier is not None
            else None
        )
        self.coord = coordination
        # On S3 a lookup is a bucket request: its answers are reused (presence.py). A stat of
        # the disk costs less than the Redis read that would decide whether to reuse one.
        self.presence = Presence(
            store,
            coordination.deletions,
            coordination.tag_moves,
            settings.s3.lookup_ttl if settings.s3 and store.lookups_are_requests else 0,
        )
        self.upstreams = upstreams
        self.clock = clock
        self.filler = filler or BlobFiller(
            store,
            coordination,
            start_timeout=settings.upstream.connect_timeout
            + settings.upstream.read_timeout
            + settings.upstream.lease_ttl,
            stall_timeout=settings.upstream.read_timeout + 3 * settings.upstream.lease_ttl,
            metrics=metrics,
            max_fills=settings.limits.max_fills,
            max_fills_per_client=settings.limits.max_fills_per_client,
            parallel_ranges=settings.upstream.parallel_ranges,
            range_min_size=settings.upstream.range_min_size,
            node_copy=self.tiering.node_copy if self.tiering is not None else None,
        )
        self.metrics = metrics
        # How long a request waits for another's upstream ask of the same tag or list.
        self.upstream_wait = (
            settings.upstream.connect_timeout + 2 * settings.upstream.small_answer_timeout
        )
        self.referrers_cache = ReferrersCache(
            store,
            self.upstream,
            self._spend,
            coordination.store.count,
            clock,
            settings.upstream.max_stale,
            lease=lambda target, subject: coordination.leases.tag(
                str(target), f"referrers@{subject}"
            ),
            wait=self.upstream_wait,
            max_bytes=settings.limits.referrers_max_bytes,
            max_descriptors=settings.limits.referrers_max_descriptors,
            fetches=settings.limits.referrers_fetches,
        )
        # The signature policy reaches signatures through the whole service (service.py).
        self.policy: SignaturePolicy | None = None

    def catalog_name(self, stored: str) -> str:
        return catalog_name(self.settings.default_registry, stored)

    def upstream(self, target: Target) -> UpstreamClient:
        return self.upstreams[target.registry.name]

    def _ask(
        self,
        target: Target,
        reference: str,
        call: Callable[[], T],
        client: str | None,
        missing: type[RegistryError] = ManifestUnknown,
    ) -> T:
        """Call upstream about `reference` for `client` (within its budget), unless upstream
        recently said the repository or the reference does not exist; remember such answers
        (`missing`: ManifestUnknown or BlobUnknown) for `negative_ttl`."""
        # Per credential: what anonymous may not see, the configured account may.
        who = self.upstream(target).identity
        repo_key, ref_key = missing_key(who, str(target)), missing_key(who, str(target), reference)
        remembered = self.coord.missing.lookup(repo_key, ref_key)
        if remembered is not None:
            kind, _, rest = remembered.partition(":")
            when, _, message = rest.partition(":")
            if not when.isdigit():  # written before the time was kept
                when, message = "", rest
            error = UpstreamDenied if kind == "denied" else missing
            ago = f" {max(0, round(self.clock() - int(when)))} s ago" if when else ""
            message = f"{message} (upstream said so{ago})"
            raise error(message, reason=message)
        self._spend(client)
        try:
            return call()
        except UpstreamDenied as exc:
            self.coord.missing.remember(
                repo_key,
                f"denied:{self.clock():.0f}:{exc.message}",
                self.settings.upstream.negative_ttl,
            )
            raise
        except (ManifestUnknown, BlobUnknown) as exc:
            self.coord.missing.remember(
                ref_key,
                f"unknown:{self.clock():.0f}:{exc.message}",
                self.settings.upstream.negative_ttl,
            )
            raise

    def _spend(self, client: str | None) -> None:
        """One upstream-reaching request of `client`, within limits.client_upstream_per_minute
        (so that one client cannot spend the whole upstream quota)."""
        per_minute = self.settings.limits.client_upstream_per_minute
        if not client or not per_minute:
            return
        wait = self.coord.limits.spend_upstream(client, per_minute)
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            message = (
                f"client {client} has made {per_minute} requests that reach upstream this "
                f"minute; retry in {seconds} s"
            )
            raise TooManyRequests(message, headers={"Retry-After": str(seconds)}, reason=message)
