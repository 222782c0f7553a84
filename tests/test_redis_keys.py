"""The Redis key schema is documented once in registry/coordination/__init__.py, and
README.md's table lists the same keys; every key a test run leaves in any test Redis matches
one of them.

Runs last (tests/conftest.py): by then every module's Redis has been read before it was
flushed or stopped (tests/support/servers.py: KEYS_SEEN). With several test processes the
keys the others found count too, and tests/conftest.py checks them all again once every
process is done.
"""

from __future__ import annotations

import re

import registry.coordination
from tests.support.servers import ROOT, keys_seen, record_keys


def pattern(documented: str) -> re.Pattern:
    """`pt:missing:<user>@<registry>/<repository>[:<reference>]` as a regular expression."""
    out = ""
    for token in re.findall(r"<[^>]+>|\[|\]|\*|[^<\[\]*]+", documented):
        if token.startswith("<"):
            out += ".*"  # a part such as <user> may be empty (anonymous)
        elif token == "[":
            out += "(?:"
        elif token == "]":
            out += ")?"
        elif token == "*":
            out += ".*"
        else:
            out += re.escape(token)
    return re.compile(out)


def schema_keys() -> set[str]:
    doc = registry.coordination.__doc__ or ""
    return set(re.findall(r"^    (pt:\S+|rq:\*)", doc, flags=re.MULTILINE))


def readme_keys() -> set[str]:
    text = (ROOT / "README.md").read_text()
    return set(re.findall(r"^\| `((?:pt|rq):[^`]+)` \|", text, flags=re.MULTILINE))


def test_the_readme_lists_the_keys_of_the_schema():
    assert schema_keys() == readme_keys()


def test_every_key_a_test_run_left_in_redis_is_documented(client, redis_server, images):
    # Whatever ran before, this test's own pull leaves keys too.
    image = images["busybox"]
    assert client.get(f"/v2/{image.repository}/manifests/{image.tag}").status_code == 200
    for digest in image.blobs:
        assert client.get(f"/v2/{image.repository}/blobs/{digest}").status_code == 200
    record_keys(redis_server.url)
    seen = keys_seen()
    assert seen and undocumented(seen) == []


def undocumented(keys: set[str]) -> list[str]:
    patterns = [pattern(key) for key in schema_keys()]
    return sorted(k for k in keys if not any(p.fullmatch(k) for p in patterns))
