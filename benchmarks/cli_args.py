"""Argument types shared by the benchmark scripts' command lines."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an int of at least 1 (a clear usage error instead of a crash deep in a timing loop)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
