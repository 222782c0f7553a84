"""Serve only signed images: the optional cosign policy of a registry's repositories.

A manifest that a `verify` rule covers is served only when a cosign key-based signature of
its digest verifies with one of the rule's keys (registry/cosign.py). The signatures are
found through the cache itself, like any pull: cosign's `<alg>-<hex>.sig` tag, and the
referrers of the digest whose artifactType is cosign's. An index that verifies covers its
children: they are recorded as verified under it and served by digest.

Attachments (signatures, attestations, SBOMs, referrers indexes) are not asked to be signed,
but only those the policy itself reached as attachments of a manifest: the `.sig` tag and
the referrers (or referrers tag schema index) of a subject it looked up, recorded per key
set. A tag's name or a manifest's `subject` only says which subject to look up; whatever is
shaped like an image (cosign.attachment_layers) is checked as one wherever it was found.

`enforce` refuses anything else with a 403 DENIED whose reason phrase says why; `warn`
serves it and logs. Verdicts are kept in Redis per digest and key set (pt:verify:*), so every
worker and node shares them and a change of keys starts afresh; a failed check is kept
only as long as referrers are (a signature pushed later is seen then).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Protocol

from registry.config import VerifyMode, VerifyRule
from registry.coordination.verdicts import StoredVerdict, Verdicts
from registry.cosign import (
    SIGNATURE_ARTIFACT_TYPE,
    Finding,
    Verdict,
    attachment_layers,
    check,
    load_key,
    signature_layers,
    signature_tag,
    subjects_named,
)
from registry.digests import Digest, parse_or_none
from registry.errors import Denied, RegistryError
from registry.metrics import Metrics
from registry.names import Target
from registry.pullthrough.manifests import InvalidManifest, manifest_node

log = logging.getLogger(__name__)

# A good verdict holds while the keys do; it is still checked again once a day.
SIGNED_TTL = 86400.0


class SignatureSource(Protocol):
    """How the policy reaches signatures: through the cache, as any pull (PullThrough)."""

    def signature_manifest(self, target: Target, reference: str) -> tuple[Digest, bytes] | None: ...

    def referrer_descriptors(self, target: Target, digest: Digest) -> list[dict]: ...

    def small_blob(self, target: Target, digest: Digest, limit: int) -> bytes: ...


class SignaturePolicy:
    def __init__(
        self,
        source: SignatureSource,
        verdicts: Verdicts,
        *,
        metrics: Metrics | None = None,
        failed_ttl: Callable[[Target], float],
    ) -> None:
        self.source = source
        self.verdicts = verdicts
        self.metrics = metrics
        self.failed_ttl = failed_ttl

    def enforce(self, target: Target, reference: str, digest: Digest, body: bytes) -> None:
        """Let the manifest be served, or raise Denied (in `enforce` mode)."""
        rule = target.registry.verify_rule(target.repository)
        if rule is None:
            return
        try:
            if self._is_attachment(rule, target, reference, digest, body):
                return
            finding = self.verdict(rule, target, digest, body)
        except RegistryError as exc:
            if rule.mode is VerifyMode.ENFORCE:
                raise  # cannot tell: not served (the error says why: upstream down, ...)
            log.warning("serving %s@%s unchecked (verify mode warn): %s", target, digest, exc)
            return
        if finding.verdict is Verdict.SIGNED:
            return
        message = f"{target}@{digest} is {finding.reason}: {finding.detail}"
        if rule.mode is VerifyMode.WARN:
            log.warning("serving %s (verify mode warn)", message)
            return
        log.warning("refused %s", message)
        raise Denied(
            message,
            detail={"digest": str(digest), "verdict": finding.verdict.value},
            reason=f"{finding.reason}: {target}@{digest.hex[:12]} refused by the cache's policy",
        )

    def known(self, rule: VerifyRule, digests: list[Digest]) -> list[StoredVerdict | None]:
        """What was found for each digest (None: not checked lately), for people (the UI)."""
        return self.verdicts.read(rule.key_set, digests)

    def _is_attachment(
        self, rule: VerifyRule, target: Target, reference: str, digest: Digest, body: bytes
    ) -> bool:
        """Whether the manifest is served as an attachment: shaped as one, and reached by the
        policy as an attachment of the subject its tag or `subject` names (or of any subject
        checked before, as recorded)."""
        layers = attachment_layers(body)
        if layers is None:
            return False
        reached = self.verdicts.attached(rule.key_set, digest) or any(
            subject != digest and digest in self._attachments(rule, target, subject)
            for subject in subjects_named(reference, body)[:2]
        )
        return reached and all(self._is_json(target, *layer) for layer in layers)

    def _is_json(self, target: Target, digest: Digest, size: int) -> bool:
        try:
            json.loads(self.source.small_blob(target, digest, size))
        except (ValueError, RegistryError):
            return False
        return True

    def _attachments(self, rule: VerifyRule, target: Target, subject: Digest) -> set[Digest]:
        """What the policy reaches as attachments of `subject` (recorded for the referrers
        TTL): its `.sig` manifest, its referrers, and the referrers tag schema's index."""
        legacy = self.source.signature_manifest(target, signature_tag(subject))
        found = {legacy[0]} if legacy is not None else set()
        found.update(
            digest
            for descriptor in self.source.referrer_descriptors(target, subject)
            if (digest := parse_or_none(descriptor.get("digest"))) is not None
        )
        index = self.source.signature_manifest(target, f"{subject.algorithm}-{subject.hex}")
        if index is not None:
            found.add(index[0])
        self.verdicts.mark_attached(
            rule.key_set, subject, sorted(found, key=str), self.failed_ttl(target)
        )
        return found

    def verdict(self, rule: VerifyRule, target: Target, digest: Digest, body: bytes) -> Finding:
        """What a check of `digest` found: the one shared in Redis, else a check made now."""
        stored = self.verdicts.read(rule.key_set, [digest])[0]
        if stored is not None:
            try:
                return Finding(Verdict(stored.verdict), stored.detail)
            except ValueError:
                pass  # written by another version: check again
        finding = self._check(rule, target, digest)
        if self.metrics is not None:
            self.metrics.signature_checks.labels(target.registry.name, finding.verdict.value).inc()
        children: list[Digest] = []
        if finding.verdict is Verdict.SIGNED:
            ttl = SIGNED_TTL
            try:
                children = [child.digest for child in manifest_node(digest, body).children]
            except InvalidManifest:
                children = []
        else:
            ttl = self.failed_ttl(target)
        self.verdicts.write(
            rule.key_set, digest, finding.verdict.value, finding.detail, ttl, children
        )
        return finding

    def _check(self, rule: VerifyRule, target: Target, digest: Digest) -> Finding:
        keys = [load_key(pem) for pem in rule.keys]
        best = Finding(Verdict.UNSIGNED, f"no cosign signature of {digest} was found")
        manifests = self._signature_manifests(target, digest)
        # The signatures just reached are served to clients that verify for themselves.
        self.verdicts.mark_attached(
            rule.key_set, digest, [found for found, _ in manifests], self.failed_ttl(target)
        )
        for _, manifest in manifests:
            for layer in signature_layers(manifest):
                try:
                    payload = self.source.small_blob(target, layer.payload, layer.size)
                except RegistryError as exc:
                    found = Finding(
                        Verdict.MISMATCH, f"its payload could not be read: {exc.message}"
                    )
                else:
                    found = check(payload, layer.signature, digest, keys)
                best = found.better(best)
                if best.verdict is Verdict.SIGNED:
                    return best
        return best

    def _signature_manifests(self, target: Target, digest: Digest) -> list[tuple[Digest, bytes]]:
        """cosign's `.sig` tag, then the cosign referrers of `digest`. What cannot be asked
        (upstream down, nothing cached) raises: no verdict is made of it."""
        found = []
        legacy = self.source.signature_manifest(target, signature_tag(digest))
        if legacy is not None:
            found.append(legacy)
        for descriptor in self.source.referrer_descriptors(target, digest):
            if descriptor.get("artifactType") != SIGNATURE_ARTIFACT_TYPE:
                continue
            body = self.source.signature_manifest(target, str(descriptor.get("digest")))
            if body is not None:
                found.append(body)
        return found
