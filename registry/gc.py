"""Garbage collection of the store: mark what kept manifests need, sweep the rest.

Runs in the GC worker (`workers/`), beside the serving processes, never stopping them.

Roots are the manifests to keep: every tag's manifest (less the tags that retention drops) and
every manifest pulled or stored within `gc.delay`. Marking walks each root's references
(config, layers, index children, recursively) per repository. The sweep then deletes, in
this order so that a sweep killed at any point leaves a consistent store: dropped tags,
unmarked manifest revisions, unmarked repository links older than `gc.delay`, unmarked blobs
older than `gc.delay`, and partial files older than `gc.delay` that no fill owns.

Safe while serving:
- A blob is deleted only while the sweep holds that digest's fill lease (`pt:lease:blob:*`),
  the lease every fill takes, and only if no pull referenced it since the sweep started
  (`pt:gc:live`, written by pulls after their references are on disk).
- A client already downloading a blob keeps reading it: the file is unlinked, not truncated,
  and handlers open blobs before they answer. A request that finds a blob just swept treats
  it as a miss and fills it again.
- One sweep at a time: the run holds `pt:gc:lock`.

Retention (off unless configured): `keep_pulled_within` drops tags not pulled for that long;
`max_size` evicts the least recently pulled images (tags, then the blobs only they used) until
the store would fit in `low_watermark x max_size`; tags matching a `pins` glob, or pinned by an
admin (store/paths.py `_pins`), are never dropped. A blob shared with a kept image is marked
through that image and stays.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from registry.config import GcSettings
from registry.coordination import Coordination
from registry.cosign import attached_subject
from registry.digests import Digest
from registry.errors import RegistryError
from registry.pullthrough.manifests import walk
from registry.pullthrough.referrers import descriptors_of
from registry.store import ContentStore, paths
from registry.store.content import RepositoryScan

log = logging.getLogger(__name__)

# Images pulled within this long are never evicted for size: a pull may still be running.
EVICT_GRACE = 3600.0
# A report lists at most this many evicted or dropped tags by name.
REPORT_NAMES = 100
# A multipart upload this old belongs to a commit that will never finish (they take seconds).
STALE_MULTIPART = 3600.0


class GcBusy(Exception):
    """Another sweep holds the GC lock."""


@dataclass
class Root:
    repo: str
    digest: Digest
    last_pulled: float
    tags: list[str] = field(default_factory=list)
    pinned: bool = False
    recent: bool = False  # pulled or stored within gc.delay: never evicted


@dataclass
class Plan:
    drop_tags: list[tuple[str, str]] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)
    revisions: list[tuple[str, Digest]] = field(default_factory=list)
    links: list[tuple[str, Digest]] = field(default_factory=list)
    referrers: list[tuple[str, Digest]] = field(default_factory=list)  # by subject
    blobs: list[tuple[Digest, int]] = field(default_factory=list)
    uploads: list[str] = field(default_factory=list)
    marked_blobs: int = 0


class Collector:
    def __init__(
        self,
        store: ContentStore,
        coord: Coordination,
        policy: GcSettings,
        *,
        catalog_name: Callable[[str], str] = lambda name: name,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.coord = coord
        self.policy = policy
        self.catalog_name = catalog_name
        self.clock = clock

    # -- the run ---------------------------------------------------------------------------------
    def run(self, dry_run: bool = False) -> dict:
        """Collect once; returns (and records in Redis) the report. Raises GcBusy."""
        lease = self.coord.gc.lease()
        if not lease.acquire():
            holder = lease.holder()
            raise GcBusy(f"another sweep is running ({holder})")
        done = threading.Event()
        lease.keep_alive(lambda: not done.is_set())
        started = self.clock()
        report: dict = {"started": round(started, 3), "dry_run": dry_run}
        try:
            repos = self.store.scan_repositories()
            blobs = {d: (size, mtime) for d, size, mtime in self.store.iter_blobs()}
            plan = self.plan(repos, blobs)
            store_bytes = sum(size for size, _ in blobs.values())
            if not dry_run:
                # The walk is the truth: correct whatever the counting in between missed.
                self.coord.store.set(store_bytes, len(blobs))
            report.update(
                repositories=len(repos),
                manifests=sum(len(scan.revisions) for scan in repos.values()),
                blobs=len(blobs),
                store_bytes=store_bytes,
                marked_blobs=plan.marked_blobs,
                evicted=plan.evicted[:REPORT_NAMES],
            )
            if dry_run:
                report.update(self._counts(plan, skipped=0))
            else:
                report.update(self.sweep(plan, repos))
            report["error"] = ""
        except Exception as exc:
            report["error"] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            done.set()
            self.coord.gc.clear_live()
            lease.release()
            report["finished"] = round(self.clock(), 3)
            report["seconds"] = round(report["finished"] - started, 3)
            self.coord.gc.record(report)
            log.info(
                "gc %s: %s",
                "dry run" if dry_run else "sweep",
                " ".join(f"{k}={v}" for k, v in report.items() if k != "evicted"),
            )
        return report

    # -- mark ------------------------------------------------------------------------------------
    def plan(
        self, repos: dict[str, RepositoryScan], blobs: dict[Digest, tuple[int, float]]
    ) -> Plan:
        now = self.clock()
        policy = self.policy
        plan = Plan()
        tag_members = [f"{repo}:{tag}" for repo, scan in repos.items() for tag in scan.tags]
        digest_members = [f"{repo}@{d}" for repo, scan in repos.items() for d in scan.revisions]
        # No pull history at all (Redis flushed): count everything as pulled now, so nothing
        # goes for lack of history; the times are recorded and age from here. Otherwise a
        # manifest never pulled by digest is as old as its tags, or its revision file.
        history = self.coord.pulls.has_history()
        pulled = self.coord.pulls.times(tag_members, default=now, record_default=True)
        pulled |= self.coord.pulls.times(
            digest_members, default=0.0 if history else now, record_default=not history
        )

        roots: dict[tuple[str, Digest], Root] = {}
        # Tags attached to a manifest (cosign's `<alg>-<hex>.sig`, the referrers tag schema's
        # `<alg>-<hex>`) are no roots: they live and go with their subject.
        attached: dict[tuple[str, Digest], list[str]] = defaultdict(list)
        for repo, scan in repos.items():
            for tag in scan.tags:
                subject = attached_subject(tag)
                if subject is not None:
                    attached[(repo, subject)].append(tag)
                    continue
                record = self.store.read_tag_of(repo, tag)
                if record is None:
                    continue  # torn or foreign: not a root, and not ours to delete
                last = pulled[f"{repo}:{tag}"]
                pinned = tag in scan.pins or policy.pinned(repo, tag)
                too_old = policy.keep_pulled_within and now - last > policy.keep_pulled_within
                if too_old and not pinned:
                    plan.drop_tags.append((repo, tag))
                    continue
                root = roots.setdefault(
                    (repo, record.digest), Root(repo, record.digest, last_pulled=last)
                )
                root.tags.append(tag)
                root.last_pulled = max(root.last_pulled, last)
                root.pinned = root.pinned or pinned
            for digest, stored in scan.revisions.items():
                last = max(pulled[f"{repo}@{digest}"], stored)
                if now - last < policy.delay:
                    root = roots.setdefault((repo, digest), Root(repo, digest, last_pulled=last))
                    root.recent = True
                    root.last_pulled = max(root.last_pulled, last)

        # The digests followed tags pointed to before (follow.keep_previous): an offline
        # rollback stays possible until the follower lets them go.
        for repo, kept in self.coord.follows.kept():
            previous = _digest_or_none(kept)
            if repo in repos and previous is not None:
                roots.setdefault((repo, previous), Root(repo, previous, last_pulled=now))

        reach: dict[tuple[str, Digest], set[Digest]] = {key: self._reach(key[1]) for key in roots}
        if policy.max_size:
            self._evict(plan, roots, reach, blobs, now)
        for key in roots:
            reach[key] = self._with_referrers(key[0], reach[key], repos[key[0]], attached)

        marked: set[Digest] = set()
        marked_in: dict[str, set[Digest]] = defaultdict(set)
        for key in roots:
            marked |= reach[key]
            marked_in[key[0]] |= reach[key]
        plan.marked_blobs = len(marked & blobs.keys())

        for (repo, subject), tags in attached.items():
            if subject not in marked_in[repo]:
                plan.drop_tags.extend((repo, tag) for tag in tags)
        for repo, scan in repos.items():
            plan.referrers.extend((repo, s) for s in scan.referrers if s not in marked_in[repo])
            for digest in scan.revisions:
                if digest not in marked_in[repo]:
                    plan.revisions.append((repo, digest))
            for digest, linked in scan.links.items():
                if digest not in marked_in[repo] and now - linked >= policy.delay:
                    plan.links.append((repo, digest))
        for digest, (size, mtime) in blobs.items():
            if digest not in marked and now - mtime >= policy.delay:
                plan.blobs.append((digest, size))
        for path, upload, mtime in self.store.iter_uploads():
            if now - mtime >= policy.delay:
                plan.uploads.append(path if upload is None else str(upload))
        return plan

    def _reach(self, digest: Digest) -> set[Digest]:
        """The manifest and everything it needs: config, layers, and index children with
        theirs, recursively (a child is kept whether or not it was fetched here)."""
        reached = {digest}
        for node in walk(digest, self.store.read_blob):
            reached.update(node.blobs)
            reached.update(child.digest for child in node.children)
        return reached

    def _with_referrers(
        self,
        repo: str,
        reached: set[Digest],
        scan: RepositoryScan,
        attached: dict[tuple[str, Digest], list[str]],
    ) -> set[Digest]:
        """`reached` and what is attached to any manifest in it, recursively (a signature of
        an SBOM): the attached tags' manifests, the cached referrers list and its entries."""
        out = set(reached)
        todo = list(reached)
        while todo:
            subject = todo.pop()
            found: set[Digest] = set()
            for tag in attached.get((repo, subject), ()):
                record = self.store.read_tag_of(repo, tag)
                if record is not None:
                    found |= self._reach(record.digest)
            if subject in scan.referrers:
                record = self.store.read_referrers_of(repo, subject)
                body = self.store.read_blob(record.digest) if record is not None else None
                if record is not None and body is not None:
                    found.add(record.digest)
                    try:
                        entries = descriptors_of(body)
                    except ValueError:
                        entries = []
                    for entry in entries:
                        found |= self._reach(Digest.parse(entry["digest"]))
            new = found - out
            out |= new
            todo.extend(new)
        return out

    def _evict(
        self,
        plan: Plan,
        roots: dict[tuple[str, Digest], Root],
        reach: dict[tuple[str, Digest], set[Digest]],
        blobs: dict[Digest, tuple[int, float]],
        now: float,
    ) -> None:
        """Drop least recently pulled images until what stays fits under the low watermark."""
        policy = self.policy
        assert policy.max_size
        refs: dict[Digest, int] = defaultdict(int)
        for key in roots:
            for digest in reach[key]:
                refs[digest] += 1
        # What would stay if nothing were evicted: referenced blobs, and those too young to go.
        staying = sum(
            size
            for digest, (size, mtime) in blobs.items()
            if refs[digest] or now - mtime < policy.delay
        )
        if staying <= policy.max_size:
            return
        goal = policy.max_size * policy.low_watermark
        candidates = sorted(
            (
                root
                for root in roots.values()
                if root.tags
                and not root.pinned
                and not root.recent
                and now - root.last_pulled >= min(EVICT_GRACE, policy.delay)
            ),
            key=lambda root: root.last_pulled,
        )
        for root in candidates:
            if staying <= goal:
                break
            key = (root.repo, root.digest)
            for digest in reach.pop(key):
                refs[digest] -= 1
                if refs[digest] == 0 and digest in blobs:
                    size, mtime = blobs[digest]
                    if now - mtime >= policy.delay:
                        staying -= size
            del roots[key]
            plan.drop_tags.extend((root.repo, tag) for tag in root.tags)
            plan.evicted.extend(f"{root.repo}:{tag}" for tag in root.tags)

    # -- sweep -----------------------------------------------------------------------------------
    def sweep(self, plan: Plan, repos: dict[str, RepositoryScan]) -> dict:
        store, coord = self.store, self.coord
        gone: list[str] = []
        try:
            deleted, freed, skipped = self._delete(plan, gone)
        finally:
            if plan.drop_tags or plan.revisions or plan.links or plan.referrers or gone:
                # What processes remember the bucket said exists is stale now
                # (pullthrough/presence.py), after a sweep that failed half-way too.
                try:
                    coord.deletions.happened()
                    if plan.drop_tags:
                        coord.tag_moves.happened()
                except RedisError as exc:
                    log.warning("gc: could not tell nodes of its deletions (%s)", exc)
        if gone:
            # Nodes' local tiers (S3) drop their copies now rather than at their LRU's turn.
            coord.tiers.deleted(gone)

        uploads = 0
        for item in plan.uploads:
            if item.startswith(f"{paths.UPLOADS}/"):
                uploads += store.delete_upload(item)
                continue
            digest = Digest.parse(item)
            lease = coord.leases.blob(digest)
            if not lease.acquire():
                continue  # its fill is alive
            try:
                uploads += store.delete_upload(store.upload_path(digest))
            finally:
                lease.release()

        emptied = []
        touched = {repo for repo, _ in plan.drop_tags} | {repo for repo, _ in plan.revisions}
        touched |= {repo for repo, _ in plan.links} | {repo for repo, _ in plan.referrers}
        for repo in touched:
            store.prune_repository(repo)
            if not store.has_manifests(repo):
                emptied.append(self.catalog_name(repo))
        coord.catalog.remove(emptied)
        report = self._counts(plan, skipped=skipped)
        # Commits of nodes that died mid-way leave multipart uploads behind on S3 (the
        # bucket's lifecycle rule does this too, where the store has one).
        uploads += store.abort_stale_commits(max(self.policy.delay, STALE_MULTIPART))
        report.update(deleted_blobs=deleted, freed_bytes=freed, deleted_uploads=uploads)
        return report

    def _delete(self, plan: Plan, gone: list[str]) -> tuple[int, int, int]:
        """The plan's deletions from the store: (blobs deleted, bytes freed, blobs skipped);
        `gone` gets each deleted blob as it goes."""
        store, coord = self.store, self.coord
        freed = deleted = skipped = 0
        deleted_tags = [f"{repo}:{tag}" for repo, tag in plan.drop_tags]
        for repo, tag in plan.drop_tags:
            store.delete_tag(repo, tag)
        coord.pulls.forget(deleted_tags)
        for repo, digest in plan.revisions:
            store.delete_revision(repo, digest)
        coord.pulls.forget([f"{repo}@{digest}" for repo, digest in plan.revisions])
        for repo, digest in plan.links:
            store.delete_link(repo, digest)
        for repo, subject in plan.referrers:
            store.delete_referrers(repo, subject)

        for digest, size in plan.blobs:
            lease = coord.leases.blob(digest)
            if not lease.acquire():
                skipped += 1  # a fill of this digest is running
                continue
            try:
                if coord.gc.is_live(digest):
                    skipped += 1  # a pull referenced it since the sweep started
                    continue
                if store.delete_blob(digest):
                    deleted += 1
                    freed += size
                    coord.store.count(-size, -1)
                    gone.append(str(digest))
            finally:
                lease.release()
        return deleted, freed, skipped

    @staticmethod
    def _counts(plan: Plan, skipped: int) -> dict:
        return {
            "deleted_tags": len(plan.drop_tags),
            "deleted_manifests": len(plan.revisions),
            "deleted_links": len(plan.links),
            "deleted_referrers": len(plan.referrers),
            "deleted_blobs": len(plan.blobs),
            "freed_bytes": sum(size for _, size in plan.blobs),
            "deleted_uploads": len(plan.uploads),
            "skipped_in_use": skipped,
        }


def _digest_or_none(text: str) -> Digest | None:
    try:
        return Digest.parse(text)
    except RegistryError:
        return None


def command(collector: Collector, dry_run: bool) -> int:
    """`gc [--dry-run]` of both command lines (`python -m registry`, `python -m workers`):
    the report as JSON on stdout; 1 when another sweep is running."""
    try:
        report = collector.run(dry_run=dry_run)
    except GcBusy as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0
