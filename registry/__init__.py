"""pullthrough: an OCI registry pull-through cache. `create_app(settings)` (registry/app.py)
builds the app; the package only re-exports, on first use, so that importing a pure module
(`registry.names`, `registry.pullthrough.manifests`) loads nothing else."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from registry.app import build_collector, build_pullthrough, create_app, upstream_session

__all__ = ["build_collector", "build_pullthrough", "create_app", "upstream_session"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from registry import app

        return getattr(app, name)
    raise AttributeError(f"module 'registry' has no attribute {name!r}")
