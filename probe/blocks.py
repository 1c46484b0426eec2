"""Generated blocks of the docs: text between a begin and an end marker that a renderer owns."""

from __future__ import annotations

import re


def generated_block(text: str, begin: str, end: str) -> str:
    """The block of ``text`` from ``begin`` to ``end``, markers included; ValueError when the markers are missing."""
    m = re.search(re.escape(begin) + r".*?" + re.escape(end), text, re.DOTALL)
    if not m:
        raise ValueError(f"no {begin} … {end} block")
    return m.group(0)
