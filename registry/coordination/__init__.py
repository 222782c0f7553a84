"""Coordination through Redis: every key pullthrough writes is named here.

Redis key schema (prefix `pt:`), the one place it is written down. Redis holds coordination
and indexes only: `FLUSHALL` loses no cached content, and every index is rebuilt from disk
when missing. Each key has one owner module that alone reads and writes it:

- registry/coordination/leases.py: pt:lease:*
- registry/coordination/limits.py: pt:fills, pt:budget:*
- registry/coordination/fill_records.py: pt:fill:*
- registry/coordination/catalog.py: pt:repos, pt:repos:built
- registry/coordination/missing.py: pt:missing:*
- registry/coordination/pulls.py: pt:pulled, pt:pulls
- registry/coordination/gcstate.py: pt:gc:*, pt:store
- registry/coordination/verdicts.py: pt:verify:*
- registry/coordination/follows.py: pt:follow:*
- registry/coordination/hourly.py: pt:hourly:*
- registry/coordination/tokens.py: pt:token:*
- registry/coordination/upstream_health.py: pt:upstream:*
- registry/coordination/tiers.py: the channel pt:tier:deleted
- registry/coordination/deletions.py: pt:deletions
- registry/coordination/tag_moves.py: pt:tag-moves
- registry/coordination/hosts.py: pt:hosts, pt:host:*, pt:hosts:tls:*
- registry/coordination/logins.py: pt:login:key, pt:login:failed:*

`Coordination` (below) is what the rest of the cache holds: one object per process that
carries each owner.

    pt:lease:blob:<digest>      string  TTL lease_ttl (5 s), renewed every lease_ttl/3 by the
                                        holder. The fill lease of a blob; the value names the
                                        holder: `<host>:<pid>:<token>`.
    pt:fill:<digest>            hash    TTL 30 s (or 3 lease_ttl) while the fill runs,
                                        refreshed with its lease, so a dead process's record
                                        goes soon; 1 h once committed; 2 min once failed
                                        (only its waiting clients need it). Owned by
                                        registry/coordination/fill_records.py (FillRecord,
                                        FillState and its transitions). Progress of the
                                        fill for followers in any process: owner, upstream,
                                        repository, size, written, stored (bytes other
                                        processes can read: on S3, the stored pieces),
                                        ranges (a parallel fill's segments, JSON
                                        [[start, next byte, end], ...]),
                                        state (starting | streaming | committing |
                                        committed | failed),
                                        reason, phase, error_class, error_message,
                                        error_reason (the status line's cause),
                                        retry_after, updated.
    pt:fills                    zset    no TTL. The fills running, `<client>|<digest>` (client:
                                        the address whose request started it, `-` for a
                                        takeover); limits.max_fills and max_fills_per_client
                                        count it. A member whose blob lease lapsed is dropped
                                        at the next admission.
    pt:budget:<client>:<minute> string  TTL 120 s. Upstream-reaching requests of one client
                                        address in one minute (limits.client_upstream_per_minute).
    pt:lease:tag:<registry>/<repository>:<tag>
                                string  TTL lease_ttl, renewed. One upstream fetch or
                                        revalidation of a tag at a time (`<tag>` is
                                        `referrers@<digest>` for a referrers list).
    pt:repos                    zset    no TTL. Catalog index: `<registry>/<repository>`,
                                        every score 0 so ZRANGEBYLEX pages it.
    pt:repos:built              string  no TTL. Set once pt:repos was rebuilt from disk; when
                                        missing (e.g. after FLUSHALL) the next catalog
                                        request rebuilds the index.
    pt:token:<sha256>           string  TTL: the token's lifetime less a margin. An upstream
                                        bearer token shared by every worker; the name hashes
                                        (upstream URL, scope, username). Keep Redis private.
    pt:upstream:<registry>:failures
                                string  TTL breaker_window. Upstream failures (refused,
                                        timeout, reset, 5xx) counted towards the breaker;
                                        deleted by any good answer.
    pt:upstream:<registry>:breaker
                                string  TTL breaker_backoff, or a 429's Retry-After. While it
                                        exists only probes call that upstream (none while a
                                        429 opened it); JSON {status, reason, since}.
    pt:upstream:<registry>:probe
                                string  TTL breaker_probe_interval. Taken (SET NX) by the one
                                        request that may probe an upstream whose breaker is
                                        open; a probe that gets an answer closes the breaker.
    pt:upstream:<registry>:ratelimit
                                hash    TTL 24 h. The last rate-limit headers upstream sent:
                                        limit, remaining, window (s), source, updated.
    pt:missing:<user>@<registry>/<repository>[:<reference>]
                                string  TTL negative_ttl. Upstream said this repository (or
                                        tag/digest) does not exist or is denied to <user> (the
                                        configured upstream account, empty when anonymous);
                                        the value is `<unknown|denied>:<unix s>:<message>`.
                                        Retry storms stop here.
    pt:pulled                   zset    no TTL. Last pull time (score, unix s) of every tag,
                                        `<registry>/<repository>:<tag>`, and manifest pulled by
                                        digest, `<registry>/<repository>@<digest>`. A member's
                                        first pull in a minute is written at once, later ones
                                        within 2 s (each process gathers them). Lost after
                                        FLUSHALL: the GC then counts unknown members as pulled
                                        now, so nothing is evicted for lack of history.
    pt:gc:lock                  string  TTL 10 s, renewed. Held by the one sweep running; the
                                        value names its holder.
    pt:gc:live                  set     TTL 1 h; deleted when a sweep ends. Digests that pulls
                                        referenced while a sweep ran: the sweep spares them.
    pt:gc:last                  hash    no TTL. The last sweep's report: started, finished,
                                        seconds, dry_run, repositories, manifests, blobs,
                                        store_bytes, marked_blobs, deleted_tags,
                                        deleted_manifests, deleted_links, deleted_referrers,
                                        deleted_blobs,
                                        deleted_uploads, freed_bytes, skipped_in_use, evicted,
                                        error.
    pt:gc:history               list    no TTL, newest first, 50 kept. JSON of each report.
    pt:gc:totals                hash    no TTL. Across all sweeps (dry runs excluded): runs,
                                        freed_bytes. Added to by every sweep's record_gc.
                                        Read by /metrics.
    pt:store                    hash    no TTL. bytes, blobs: the store's committed content.
                                        Set exactly by each GC sweep from its walk of the
                                        store (and by `rebuild-index`), lowered by what the
                                        sweep deletes, counted up by fills and new manifests
                                        in between (only once a walk has set it). Read by
                                        /metrics and the UI.
    pt:pulls                    hash    no TTL. Pull count per `<registry>/<repository>:<tag>`
                                        (and `@<digest>`), added up in each process and written
                                        with pt:pulled.
    pt:gc:scheduled             string  TTL 0.9 x gc.interval. Taken (SET NX) by the scheduler
                                        that enqueues this interval's sweep, so several
                                        schedulers enqueue it once.
    pt:verify:<keyset>:<digest>
                                string  TTL 24 h when signed, else the registry's
                                        referrers_ttl. What the cosign check of a manifest
                                        against one set of keys (a hash of them) found:
                                        JSON {verdict (signed | mismatch | unknown_key |
                                        unsigned), detail, checked, via (the signed index a
                                        child is covered by)}.
    pt:verify:<keyset>:attached:<digest>
                                string  TTL the registry's referrers_ttl. The subject whose
                                        `.sig` tag, referrers or referrers tag schema index
                                        the policy reached this manifest as: served unsigned
                                        while it is shaped as an attachment.
    pt:follow:spent             string  TTL follow.interval from its first bytes. Bytes the
                                        follower fetched from upstream in this window, against
                                        follow.max_bytes.
    pt:follow:<registry>/<repository>:<tag>
                                hash    no TTL; deleted when the tag is no longer followed.
                                        A followed tag (registry/pullthrough/follower.py):
                                        pattern, state (waiting | current | fetching | quota
                                        | budget | breaker | missing | failed), digest,
                                        previous (JSON
                                        list: kept from the GC), last_check, message,
                                        fetched_bytes.
    pt:follow:due               zset    no TTL. Every followed tag, scored by its next check
                                        (unix s).
    pt:follow:tags:<registry>/<repository>
                                string  TTL the follow interval. The repository's upstream
                                        tag list (JSON), asked once per interval.
    pt:follow:totals            hash    no TTL. `<registry>|<what>`: the follower's upstream
                                        requests (head, manifest, blob, tags), bytes fetched,
                                        and checks by state (check_<state>). Read by /metrics.
    pt:follow:scheduled         string  TTL 0.9 x follow.tick. Taken by the scheduler that
                                        enqueues this tick.
    pt:follow:lock              string  TTL 30 s, renewed. Held by the one tick running; the
                                        value names its holder.
    pt:hourly:<registry>:<hour> hash    TTL 8 days. One UTC hour (YYYYMMDDHH) of manifest GETs:
                                        saved (answered without an upstream GET), fetched
                                        (needed one), and quota_remaining / quota_limit as
                                        last seen in it. Written by each process every 2 s.
                                        Read by the UI's overview and /metrics.
    pt:hosts                    zset    no TTL. The clients that sent /v2/ requests,
                                        `<engine>@<address>`, scored by when last seen; at
                                        most hosts.max (the least recently seen dropped, with
                                        their hashes). Written by each process every 1 s.
    pt:host:<engine>@<address>  hash    no TTL (dropped with its pt:hosts member). One
                                        client's row of the Hosts page: address, engine,
                                        version, agent (User-Agent, cut to 80), route (mirror
                                        | ns | prefix), first_seen, last_seen, requests,
                                        pulls (manifest requests by tag), bytes (that left),
                                        hits and answered (the hit ratio), error_status,
                                        error_cause, error_at (its last error).
    pt:hosts:tls:<outcome>:<address>
                                string  TTL 1 h. Set (NX) when the log has said of a client
                                        that it tried TLS on the plain port (outcome: fell
                                        back to http, or did not): once per client per hour.
    pt:tier:deleted             channel pub/sub, nothing stored. Each GC sweep publishes the
                                        digests it deleted (space-separated); every node's
                                        local tier (storage.s3.local_cache) drops its copies.
    pt:deletions                string  no TTL. A random token, rewritten after anything is
                                        deleted from the store (GC sweep, admin evict, admin
                                        verify --delete). A node reuses the store's word that
                                        a blob, a repository's link to it or a revision exists
                                        (storage.s3.lookup_ttl) only while the token is the
                                        one it read before asking.
    pt:tag-moves                string  no TTL. A random token, rewritten after a tag's file
                                        comes to name another digest or is deleted (a moved
                                        tag fetched, the follower, admin evict, GC sweep). A
                                        node reuses a tag record it read from the bucket
                                        (storage.s3.lookup_ttl, while the tag is fresh) only
                                        while the token is the one it read before reading.
    pt:login:key                string  no TTL. The key the cache's own login tokens are
                                        signed with (auth:), made by the first process to
                                        need it; a new one after a FLUSHALL logs clients out.
    pt:login:failed:<address>   string  TTL 15 min from the first. Failed logins of one client
                                        address; past auth.max_failed_logins it is refused
                                        (429) until the key expires.
    rq:*                                rq's own keys for the `pullthrough` queue and worker.
"""

from registry.coordination.handle import Coordination, connect, redis_address
from registry.coordination.leases import Lease, blob_lease_key, tag_lease_key
from registry.coordination.missing import missing_key

__all__ = [
    "Coordination",
    "Lease",
    "blob_lease_key",
    "connect",
    "missing_key",
    "redis_address",
    "tag_lease_key",
]
