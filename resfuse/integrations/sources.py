"""Class names as the architecture table writes them: ``"module:qualname"``."""

from __future__ import annotations


def class_key(cls) -> str:
    """``"module:qualname"``, the name the architecture table uses for a class."""
    return f"{cls.__module__}:{cls.__qualname__}"
