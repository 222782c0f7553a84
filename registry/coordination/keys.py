"""The prefix of every key pullthrough writes (the schema: registry/coordination/__init__.py)."""

PREFIX = "pt:"
