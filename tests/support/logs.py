"""Capturing kvrun's log messages in tests."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

__all__ = ["kvrun_log"]


@contextlib.contextmanager
def kvrun_log(level: int) -> Iterator[list[str]]:
    """Messages of the 'kvrun' logger (which does not propagate once configured)."""
    messages: list[str] = []
    handler = logging.Handler(level)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("kvrun")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, old_level or level))
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
