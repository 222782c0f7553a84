"""The prefix of every key pullthrough writes (the schema: registry/coordination/__init__.py)."""

PREFIX = "pt:"


def text(value: object) -> str:
    """A Redis reply as text: replies are bytes (clients do not decode them)."""
    return value.decode() if isinstance(value, bytes) else str(value)
