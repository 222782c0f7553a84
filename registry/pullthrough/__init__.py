"""Pull-through: the service that composes the upstream clients, the store and Redis
(service.py), and the parts it is made of (one module each). Only re-exports."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from registry.pullthrough.answers import Blob, Manifest, Prefetched
    from registry.pullthrough.service import PullThrough

__all__ = ["Blob", "Manifest", "Prefetched", "PullThrough"]


def __getattr__(name: str) -> Any:
    if name == "PullThrough":
        from registry.pullthrough import service

        return service.PullThrough
    if name in __all__:
        from registry.pullthrough import answers

        return getattr(answers, name)
    raise AttributeError(f"module 'registry.pullthrough' has no attribute {name!r}")
