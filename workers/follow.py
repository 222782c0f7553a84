"""The follower's rq job: one tick of registry/pullthrough/follower.py (check the followed
tags that are due, fetch what moved). The scheduler (workers/gc.py) enqueues it every
`follow.tick` seconds, once across all schedulers (`pt:follow:scheduled`)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from registry import build_pullthrough
from registry.config import Settings, load_settings
from registry.pullthrough.follower import Follower

log = logging.getLogger(__name__)


def follower(settings: Settings, **options: Any) -> Follower:
    pt = build_pullthrough(settings)
    return Follower(pt, pt.coord.follows, settings.follow, **options)


def tick(force: bool = False) -> dict:
    """The rq job: one tick with the settings of this process's environment."""
    report = follower(load_settings()).tick(force=force)
    log.info("follow: %s", report)
    return asdict(report)
