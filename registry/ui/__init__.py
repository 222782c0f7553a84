"""The web UI: its views (views.py), charts (charts.py) and templates. Only re-exports."""

from registry.ui.views import bp

__all__ = ["bp"]
