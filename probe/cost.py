"""What the adaptive query attacker's measured queries cost one client, and several colluding ones, under a quota.

From the black-box rows (every query counted, the confirming ones too): the queries the attacker sent
per image it confirmed as broken, and from that, at ``quota`` items per key per quota window,
how many images one key breaks per window and how many windows ``keys`` keys need for the whole sample
(a window's quota can be spent at once, so n windows take at least n − 1 windows of waiting).
Only arithmetic on measured counts; the quota is the operator's choice (``serve --quota``), not measured.
"""

from __future__ import annotations

import math


def budgets_of(blackbox: dict, method: str) -> list[int]:
    """The adaptive Square's budgets against ``method`` in a black-box section (sections written before per-method budgets name one list)."""
    return blackbox.get("budgets_by_method", {}).get(method, blackbox["budgets"])


def attacker_cost(blackbox: dict, quota: int, keys: list[int]) -> list[dict]:
    """One row per (method, server) at the method's largest budget, with the main queries per candidate."""
    rows = []
    for r in blackbox["rows"]:
        if (
            r["attacker"].startswith("transfer")
            or r["score_queries"] != blackbox["score_queries"]
            or r["budget"] != max(budgets_of(blackbox, r["method"]))
        ):
            continue
        broken = int(r["confirmed_broken"])
        sent = int(r["queries_sent"])
        per_broken = sent / broken if broken else None
        rows.append(
            {
                "method": r["method"],
                "server": r["server"],
                "budget": r["budget"],
                "images": r["n"],
                "broken": broken,
                "queries_sent": sent,
                "queries_per_broken": per_broken,
                "broken_per_window_per_key": quota / per_broken if per_broken else 0.0,
                "windows_for_sample": {k: math.ceil(sent / (k * quota)) if quota else None for k in keys},
            }
        )
    return rows
