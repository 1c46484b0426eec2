"""Typed results of the report's stages, converted to and from the results file (``RESULTS.json``) at its boundary.

The file keeps its shape (auditors and the docs' tests read it); inside, the stages and the text use these
classes, so the text never parses a label back into the method and setting it was made from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PLAIN = "plain"  # the setting without RCI; the others are RCI's scopes


@dataclass(frozen=True)
class SeedTest:
    """One seed's exact McNemar test: Δ = accuracy of A − accuracy of B, images only A / only B got right, p."""

    seed: int
    diff: float
    only_a: int
    only_b: int
    p: float

    @classmethod
    def from_dict(cls, d: dict) -> SeedTest:
        return cls(int(d["seed"]), float(d["diff"]), int(d["only_a"]), int(d["only_b"]), float(d["p"]))


@dataclass(frozen=True)
class PairedTest:
    """A (``method`` in ``setting``) against B (``vs_method`` in ``vs_setting``) at ``eps``, per seed, on the same images."""

    method: str
    setting: str
    vs_method: str
    vs_setting: str
    eps: str
    tests: tuple[SeedTest, ...] = ()

    @property
    def rci_vs_plain(self) -> bool:
        """One method with RCI in a scope against itself without RCI."""
        return self.method == self.vs_method and self.setting != PLAIN and self.vs_setting == PLAIN

    def _label(self, method: str, setting: str) -> str:
        if self.method != self.vs_method:
            return method
        return f"{method}, no RCI" if setting == PLAIN else f"{method}, RCI {setting}"

    @property
    def a(self) -> str:
        return self._label(self.method, self.setting)

    @property
    def b(self) -> str:
        return self._label(self.vs_method, self.vs_setting)

    def to_dict(self) -> dict:
        """The results file's row: labels of A and B, and ``setting`` ("no RCI" between methods, else the scope)."""
        setting = "no RCI" if self.setting == PLAIN else self.setting
        return {"eps": self.eps, "a": self.a, "b": self.b, "setting": setting, "tests": [asdict(t) for t in self.tests]}

    @classmethod
    def from_dict(cls, d: dict, methods: list[str]) -> PairedTest:
        """A row of the results file: between methods when its ``setting`` is "no RCI", else the method of ``methods``
        whose RCI-vs-no-RCI labels are the row's (recognised, not parsed)."""
        tests = tuple(SeedTest.from_dict(t) for t in d["tests"])
        if d["setting"] == "no RCI":
            return cls(d["a"], PLAIN, d["b"], PLAIN, d["eps"], tests)
        for m in methods:
            row = cls(m, d["setting"], m, PLAIN, d["eps"], tests)
            if (row.a, row.b) == (d["a"], d["b"]):
                return row
        raise ValueError(f"paired test {d['a']!r} vs {d['b']!r} names none of the methods {methods}")


@dataclass(frozen=True)
class BlackBoxRow:
    """One attack over HTTP on one method's model in one server setting, scored on draws of the served function."""

    method: str
    model: str
    attacker: str
    budget: int
    score_queries: int | None
    server: str
    accuracy: float
    interval: tuple[float, float]
    n: int
    draws: int
    majority: list[bool]
    score: list[float]
    queries: list[int]
    queries_median: float
    queries_p90: float
    queries_mean: float
    queries_median_broken: float | None
    extra: dict[str, Any] = field(
        default_factory=dict
    )  # what the attacker adds (confirmed breaks, queries sent, seconds, clean accuracies)

    @property
    def transfer(self) -> bool:
        return self.attacker.startswith("transfer")

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        d["interval"] = list(self.interval)
        return {**d, **extra}

    @classmethod
    def from_dict(cls, d: dict) -> BlackBoxRow:
        names = [f for f in cls.__dataclass_fields__ if f != "extra"]
        return cls(
            **{k: d[k] for k in names if k != "interval"},
            interval=tuple(d["interval"]),
            extra={k: v for k, v in d.items() if k not in names},
        )
