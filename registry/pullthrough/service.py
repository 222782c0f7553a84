"""Pull-through: the only module that composes the upstream clients, the store and Redis.

Handlers ask it for a manifest, a blob, a tag list or the catalog and cannot tell whether the
answer came from disk or upstream. Data flows one way: api -> pullthrough -> store |
coordination -> upstream -> store.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from redis.exceptions import RedisError

from registry.digests import Digest
from registry.errors import (
    NameUnknown,
    RegistryError,
)
from registry.names import Target, is_tag
from registry.pullthrough.blob_pulls import BlobPulls
from registry.pullthrough.manifest_pulls import ManifestPulls
from registry.pullthrough.policy import SignaturePolicy
from registry.pullthrough.referrers import Referrers

log = logging.getLogger("registry.pullthrough")


class PullThrough(ManifestPulls, BlobPulls):
    """The pull-through service: manifests (manifest_pulls.py), blobs (blob_pulls.py),
    referrers and listings (here), over the services of base.py."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if any(registry.verify for registry in self.settings.registries):
            self.policy = SignaturePolicy(
                self,
                self.coord.verdicts,
                metrics=self.metrics,
                failed_ttl=lambda target: target.registry.referrers_ttl,
            )

    def referrers(self, target: Target, digest: Digest, client: str | None = None) -> Referrers:
        return self.referrers_cache.get(target, digest, client)

    def referrer_descriptors(self, target: Target, digest: Digest) -> list[dict]:
        return self.referrers(target, digest).descriptors

    def tags(
        self, target: Target, n: int | None, last: str | None, client: str | None = None
    ) -> tuple[list[str], bool]:
        """Tags of a repository and whether more follow; upstream first, the cache when it fails."""
        try:
            self._spend(client)
            data = self.upstream(target).list_tags(target.repository, n, last)
            tags = [t for t in data.get("tags") or [] if is_tag(t)]  # upstream's: input
            return tags, n is not None and len(tags) >= n
        except NameUnknown:
            raise
        except RegistryError as exc:
            cached = self.store.list_tags(target)
            if not cached:
                raise NameUnknown(
                    f"{target} is not cached and its upstream failed: {exc.message}"
                ) from None
            return _page(cached, n, last)

    def _catalog_names(self) -> list[str]:
        return sorted({self.catalog_name(name) for name in self.store.iter_repositories()})

    def catalog(self, n: int | None, last: str | None) -> tuple[list[str], bool]:
        try:
            names = self.coord.catalog.page(None if n is None else n + 1, last, self._catalog_names)
        except RedisError:
            return _page(self._catalog_names(), n, last)
        if n is not None and len(names) > n:
            return names[:n], True
        return names, False


def _page(items: Sequence[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    chosen = [i for i in items if i > last] if last else list(items)
    if n is None:
        return chosen, False
    return chosen[:n], len(chosen) > n
