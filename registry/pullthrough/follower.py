"""Keep followed tags warm: fetch a tag's new version before anyone asks for it.

Each tick (the scheduler's rq job, or `python -m registry follow`) finds the followed tags
(`follow.images` patterns, and with `follow.pulled_within` every tag pulled that recently),
and checks those that are due: once per interval each, at a point of the interval that is
its own (no burst at the top of the hour). A check is a `HEAD` of the tag (Docker Hub does
not count HEADs against its pull quota); only when the digest moved is the manifest fetched,
then the blobs of the platforms wanted, through the same single-flight fills client pulls
use, so a client pulling meanwhile joins them. Manifest GETs are spent only while upstream's
`ratelimit-remaining` stays above `follow.quota_reserve` of its limit, and nothing is asked
while the breaker is open: such work waits for the next interval. The digest a tag pointed
to before is kept from the GC (`keep_previous`) for an offline rollback.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from registry.config import FollowRule, FollowSettings
from registry.coordination.follows import Follows
from registry.cosign import attached_subject
from registry.digests import Digest
from registry.errors import ManifestUnknown, NameUnknown, RegistryError
from registry.follow import FollowState, Pattern, parse_pattern, spread
from registry.names import Repository, Tag, Target, is_tag, resolve
from registry.pullthrough.answers import Manifest
from registry.pullthrough.manifests import InvalidManifest, ManifestNode, manifest_node
from registry.pullthrough.service import PullThrough
from registry.store import TagRecord

log = logging.getLogger(__name__)

# progress(member, digest, bytes so far, size): how a terminal draws bars.
Progress = Callable[[str, Digest, int, int], None]


@dataclass
class Followed:
    pattern: str  # what made it followed: a follow.images pattern, or "pulled within"
    rule: FollowRule | None


@dataclass
class TickReport:
    skipped: bool = False  # another tick was running
    followed: int = 0
    checked: int = 0
    states: dict[str, int] = field(default_factory=dict)
    fetched_bytes: int = 0


class Follower:
    def __init__(
        self,
        pt: PullThrough,
        follows: Follows,
        settings: FollowSettings,
        *,
        clock: Callable[[], float] = time.time,
        progress: Progress | None = None,
    ) -> None:
        self.pt = pt
        self.follows = follows
        self.settings = settings
        self.clock = clock
        self.progress = progress
        self._repositories: list[str] | None = None  # the store's, walked once per tick

    # -- which tags ----------------------------------------------------------------------------
    def discover(self, now: float) -> dict[str, Followed]:
        """`<registry>/<repository>:<tag>` of every followed tag."""
        found: dict[str, Followed] = {}
        for rule in self.settings.images:
            pattern = parse_pattern(rule.image)
            for target in self._targets(pattern):
                for tag in self._tags(target, pattern, rule):
                    found.setdefault(f"{target}:{tag}", Followed(rule.image, rule))
        if self.settings.pulled_within is not None:
            for member in self.pt.coord.pulls.recent(now - self.settings.pulled_within):
                _, sep, tag = member.rpartition(":")
                if sep and "@" not in member and attached_subject(tag) is None:
                    found.setdefault(member, Followed("pulled recently", None))
        return found

    def _targets(self, pattern: Pattern) -> list[Target]:
        if not pattern.name_is_glob:
            try:
                return [resolve(self.pt.settings, pattern.name, None)]
            except RegistryError as exc:
                log.warning("follow %s: %s", pattern.name, exc.message)
                return []
        first, _, rest = pattern.name.partition("/")
        registry = self.pt.settings.registry(first) if rest else None
        glob = rest if registry is not None else pattern.name
        registry = registry or self.pt.settings.registry(self.pt.settings.default_registry)
        assert registry is not None
        if registry.name == "docker.io" and "/" not in glob:
            glob = f"library/{glob}"
        chosen = Pattern(glob, pattern.tag)
        if self._repositories is None:
            # One walk of the store's repositories per tick, whatever the number of globs.
            self._repositories = sorted(set(self.pt.store.iter_repositories()))
        out = []
        for stored in self._repositories:
            name, _, repository = stored.partition("/")
            if name == registry.name and chosen.matches_name(repository):
                out.append(Target(registry, Repository(repository)))
        return sorted(set(out), key=str)

    def _tags(self, target: Target, pattern: Pattern, rule: FollowRule) -> list[str]:
        if pattern.tag_is_literal:
            return [pattern.tag]
        tags: Sequence[str] | None = self.follows.upstream_tags(str(target))
        if tags is None:
            try:
                tags = self._list_tags(target)
            except RegistryError as exc:
                log.warning("follow %s: tags/list failed: %s", target, exc.message)
                tags = self.pt.store.list_tags(target)  # what we hold, at least
            else:
                ttl = rule.interval or self.settings.interval
                self.follows.remember_upstream_tags(str(target), tags, ttl)
        # Upstream's list (or Redis's copy of it) is input: only valid tags are followed.
        return sorted(tag for tag in tags if is_tag(tag) and pattern.matches_tag(tag))

    def _list_tags(self, target: Target) -> list[Tag]:
        upstream = self.pt.upstream(target)
        tags: list[Tag] = []
        last = None
        for _ in range(50):  # pages of 1000: enough for any real repository
            self.follows.count(target.registry.name, "tags")
            page = upstream.list_tags(target.repository, 1000, last)
            names = page.get("tags") or []
            valid = [t for t in names if is_tag(t)]
            tags.extend(Tag(t) for t in valid)
            if len(names) < 1000 or not valid:
                break
            last = valid[-1]
        return tags

    # -- the tick ------------------------------------------------------------------------------
    def tick(self, *, force: bool = False) -> TickReport:
        """Check every followed tag that is due (every one with `force`); nothing while
        another tick runs (on any node)."""
        lease = self.follows.lease(self.pt.coord.owner)
        if not lease.acquire():
            log.info("follow: another tick is running (%s)", lease.holder())
            return TickReport(skipped=True)
        running = threading.Event()
        lease.keep_alive(lambda: not running.is_set())
        try:
            return self._tick(force)
        finally:
            running.set()
            lease.release()

    def _tick(self, force: bool) -> TickReport:
        now = self.clock()
        self._repositories = None
        wanted = self.discover(now)
        report = TickReport(followed=len(wanted))
        for member, followed in wanted.items():
            interval = self._interval(followed)
            self.follows.track(member, followed.pattern, now + spread(member, interval))
        gone = sorted(set(self.follows.followed()) - wanted.keys())
        self.follows.untrack(gone)
        due = list(wanted) if force else [m for m in self.follows.due(now) if m in wanted]
        for member in due:
            try:
                state, fetched = self.check(member, wanted[member])
            except Exception as exc:  # one tag's trouble (a full disk) must not stop the rest
                log.exception("follow %s: check failed", member)
                self.follows.update(
                    member, now + self._interval(wanted[member]),
                    state=FollowState.FAILED.value, message=str(exc)[:300], last_check=now,
                )  # fmt: skip
                state, fetched = FollowState.FAILED, 0
            report.checked += 1
            report.states[state.value] = report.states.get(state.value, 0) + 1
            report.fetched_bytes += fetched
        return report

    def _interval(self, followed: Followed) -> float:
        if followed.rule is not None and followed.rule.interval:
            return followed.rule.interval
        return self.settings.interval

    def check(self, member: str, followed: Followed) -> tuple[FollowState, int]:
        """One followed tag: HEAD it, and fetch what moved."""
        now = self.clock()
        next_check = now + self._interval(followed)
        repo, _, tag = member.rpartition(":")
        name, _, repository = repo.partition("/")
        registry = self.pt.settings.registry(name)
        try:
            if registry is None:
                raise NameUnknown(f"registry {name[:100]!r} is not configured")
            target, tag = Target(registry, Repository(repository)), Tag(tag)
        except RegistryError as exc:  # a member this cache would not have written
            log.warning("follow %r: not followed: %s", member[:300], exc.message)
            self.follows.untrack([member])
            return FollowState.MISSING, 0
        assert registry is not None

        def done(state: FollowState, message: str = "", **fields: object) -> None:
            self.follows.update(
                member, next_check, state=state.value, message=message, last_check=now, **fields
            )
            self.follows.count(registry.name, f"check_{state.value}")

        status = self.pt.coord.upstream_status(registry.name)
        if status.get("breaker"):
            done(FollowState.BREAKER, f"{registry.name}'s breaker is open: next interval")
            return FollowState.BREAKER, 0
        upstream = self.pt.upstream(target)
        try:
            self.follows.count(registry.name, "head")
            head = upstream.head_manifest(repository, tag)
        except (ManifestUnknown, NameUnknown) as exc:
            done(FollowState.MISSING, exc.message)
            return FollowState.MISSING, 0
        except RegistryError as exc:
            done(FollowState.FAILED, exc.message)
            return FollowState.FAILED, 0
        cached = self.pt.store.read_tag(target, tag)
        if cached is not None and head.digest == cached.digest:
            # Upstream confirmed it: clients are served it without asking for tag_ttl.
            self.pt.store.write_tag(target, tag, TagRecord(cached.digest, cached.media_type, now))
            record = self.follows.read([member])[0]
            if record.digest == str(cached.digest) and record.state == FollowState.CURRENT:
                done(FollowState.CURRENT, digest=str(cached.digest))
                return FollowState.CURRENT, 0
            # Followed just now, or a fetch of it broke off: its blobs (which no quota
            # counts) may be missing still.
            try:
                body = self.pt.child_manifest(target, cached.digest).body
                fetched = self._fill(member, target, cached.digest, body, cached, followed)
            except BudgetSpent as exc:
                done(FollowState.BUDGET, str(exc))
                return FollowState.BUDGET, 0
            except RegistryError as exc:
                done(FollowState.FAILED, exc.message)
                return FollowState.FAILED, 0
            done(FollowState.CURRENT, digest=str(cached.digest), fetched_bytes=fetched)
            return FollowState.CURRENT, fetched
        # The HEAD just brought the quota headers (Docker Hub sends them on HEADs too).
        status = self.pt.coord.upstream_status(registry.name)
        if self._quota_low(status):
            done(
                FollowState.QUOTA,
                f"{registry.name} quota at {status.get('remaining')} of {status.get('limit')}: "
                f"below the reserve of {self.settings.quota_reserve:.0%}",
            )
            return FollowState.QUOTA, 0
        self.follows.update(member, state=FollowState.FETCHING.value, last_check=now)
        try:
            fetched, manifest = self._fetch(member, target, tag, cached, followed)
        except BudgetSpent as exc:
            done(FollowState.BUDGET, str(exc))
            return FollowState.BUDGET, 0
        except RegistryError as exc:
            log.warning("follow %s: fetch failed: %s", member, exc.message)
            done(FollowState.FAILED, exc.message)
            return FollowState.FAILED, 0
        previous = self.follows.read([member])[0].previous
        if cached is not None and cached.digest != manifest.digest:
            previous = [str(cached.digest), *[d for d in previous if d != str(cached.digest)]]
        done(
            FollowState.CURRENT,
            digest=str(manifest.digest),
            previous=previous[: self.settings.keep_previous],
            fetched_bytes=fetched,
        )
        log.info("follow %s: now %s, %d bytes fetched", member, manifest.digest, fetched)
        return FollowState.CURRENT, fetched

    def _quota_low(self, status: dict) -> bool:
        try:
            limit, remaining = int(status["limit"]), int(status["remaining"])
        except (KeyError, ValueError):
            return False  # no quota headers: nothing to keep in reserve
        return limit > 0 and remaining <= self.settings.quota_reserve * limit

    # -- fetching ------------------------------------------------------------------------------
    def _fetch(
        self,
        member: str,
        target: Target,
        tag: str,
        cached: TagRecord | None,
        followed: Followed,
    ) -> tuple[int, Manifest]:
        """The tag's new manifest (a quota-counted GET) and its blobs."""
        self.follows.count(target.registry.name, "manifest")
        manifest = self.pt.fetch_tag(target, tag)
        fetched = self._fill(member, target, manifest.digest, manifest.body, cached, followed)
        return fetched, manifest

    def _fill(
        self,
        member: str,
        target: Target,
        digest: Digest,
        body: bytes,
        before: TagRecord | None,
        followed: Followed,
    ) -> int:
        """The blobs of a manifest (of the platforms wanted, for an index); the bytes that
        came from upstream."""
        node = _node(digest, body)
        sizes = dict(node.sizes) if node else {}
        blobs = list(node.blobs) if node else []
        if node is not None and node.children:
            wanted = set(followed.rule.platforms) if followed.rule else set()
            wanted = wanted or self._platforms_pulled_before(before)
            for child in node.children:
                # A rule without platforms follows them all; a tag followed because it was
                # pulled, only the platforms that were (none: the index alone).
                unwanted = child.platform not in wanted if wanted else followed.rule is None
                if not child.platform or unwanted:
                    continue
                child_manifest = self.pt.child_manifest(target, child.digest)
                if child_manifest.cache == "miss":
                    self.follows.count(target.registry.name, "manifest")
                child_node = _node(child.digest, child_manifest.body)
                blobs.extend(child_node.blobs if child_node else [])
                sizes.update(child_node.sizes if child_node else {})
        return sum(self._blob(member, target, d, sizes.get(d, 0)) for d in dict.fromkeys(blobs))

    def _platforms_pulled_before(self, cached: TagRecord | None) -> set[str]:
        """The platforms of the tag's previous index whose manifests the cache holds."""
        if cached is None:
            return set()
        body = self.pt.store.read_manifest(cached.digest)
        node = _node(cached.digest, body) if body is not None else None
        if node is None:
            return set()
        return {
            child.platform
            for child in node.children
            if child.platform and self.pt.store.read_manifest(child.digest) is not None
        }

    def _blob(self, member: str, target: Target, digest: Digest, size: int) -> int:
        """Fetch a blob through the cache's fills (joined by any client asking meanwhile);
        the bytes this fetch brought from upstream. BudgetSpent when `size` more bytes would
        go past follow.max_bytes in this window."""
        spent, ends = self.follows.spent()
        if spent + size > self.settings.max_bytes and self.pt.store.blob_size(digest) is None:
            raise BudgetSpent(
                f"{spent} of follow.max_bytes {self.settings.max_bytes} fetched in this "
                f"window, {size} more needed: next window (in {ends:.0f} s)"
            )
        progress = self.progress

        def report(done: int, size: int) -> None:
            if progress is not None:
                progress(member, digest, done, size)

        try:
            got = self.pt.prefetch_blob(target, digest, report)
        except RegistryError:
            self.follows.count(target.registry.name, "blob")  # a request that failed
            self._drop_partial(digest)
            raise
        if not got.miss or got.joined:
            return 0
        self.follows.spend(got.size, self.settings.interval)
        self.follows.count(target.registry.name, "blob")
        self.follows.count(target.registry.name, "bytes", got.size)
        return got.size

    def _drop_partial(self, digest: Digest) -> None:
        """A prefetch that upstream broke off leaves nothing behind: the next interval
        fetches the blob again. Under the blob's lease, so that no fill started since (a
        client's) loses its file."""
        lease = self.pt.coord.leases.blob(digest)
        if not lease.acquire():
            return  # a fill runs again: the file is its
        try:
            if self.pt.store.blob_size(digest) is None:
                self.pt.store.delete_upload(self.pt.store.upload_path(digest))
        finally:
            lease.release()


class BudgetSpent(Exception):
    """follow.max_bytes is spent in this window: what is left waits for the next one."""


def _node(digest: Digest, body: bytes) -> ManifestNode | None:
    try:
        return manifest_node(digest, body)
    except InvalidManifest:
        return None
