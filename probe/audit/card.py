"""The audit's robustness card: what ``codedsmooth audit`` found about one endpoint, as a pydantic model.

The JSON a card is written as validates against this model, and its JSON Schema is published in
``docs/audit-card.schema.json`` (``write_schema``), so a reader can check a card without this package.
Every accuracy is a count of images with its Wilson interval (``probe.stats.wilson``); every attack says
what it cost in queries and what the endpoint's limits (429 / 503 with ``Retry-After``) cost in time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..stats import wilson

SCHEMA_VERSION: Literal[1] = 1


class Interval(BaseModel):
    """A proportion of images with its 95 % Wilson score interval."""

    model_config = ConfigDict(extra="forbid")
    value: float = Field(ge=0, le=1)
    successes: int = Field(ge=0)
    n: int = Field(ge=1)
    low: float = Field(ge=0, le=1)
    high: float = Field(ge=0, le=1)

    @classmethod
    def of(cls, successes: int, n: int) -> Interval:
        p = wilson(successes, n)
        return cls(value=p.value, successes=successes, n=n, low=p.low, high=p.high)


class EndpointInfo(BaseModel):
    """Which endpoint was audited, as it described itself."""

    model_config = ConfigDict(extra="forbid")
    url: str
    protocol: Literal["v1", "v2"]
    model: str
    version: str | None = None
    checkpoint_sha256: str | None = Field(None, description="where the server exposes it")
    input: str = Field(description="the input tensor sent: name, datatype, shape")
    returns: Literal["scores", "labels"]
    randomized: bool = Field(description="two answers to one input differed (RCI, input noise, ...)")


class Sample(BaseModel):
    """The audited images: a class-balanced sample of the test split, by index."""

    model_config = ConfigDict(extra="forbid")
    data: str
    split: Literal["test"] = "test"
    seed: int
    indices: list[int]
    labels: list[int]


class RequestShape(BaseModel):
    """What the endpoint's metadata cannot say, as the audit sent it."""

    model_config = ConfigDict(extra="forbid")
    pixel_scale: float
    layout: str
    class_order: list[int] | None
    output: str


class Queries(BaseModel):
    """Queries an attack spent per broken image."""

    model_config = ConfigDict(extra="forbid")
    median: float | None
    p90: float | None
    total: int = Field(ge=0, description="every query of the attack, broken images or not")


class AttackResult(BaseModel):
    """One attack on the sample: robust accuracy (correct and not broken, out of every image of the sample)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    method: str
    access: Literal["scores", "labels"]
    status: Literal["complete", "incomplete", "skipped"]
    reason: str | None = None
    budget: int = Field(description="queries per image")
    robust_accuracy: Interval | None = None
    broken: int = 0
    attacked: int = Field(0, description="images attacked (those correct when clean)")
    queries_per_broken_image: Queries | None = None


class Traffic(BaseModel):
    """What the endpoint cost: queries, the 429s and 503s met, the time waited on them, and the rate seen."""

    model_config = ConfigDict(extra="forbid")
    queries: int
    requests: int
    status_429: int
    status_503: int
    waited_s: float
    wall_s: float
    queries_per_second: float | None
    days_per_million_queries: float | None = Field(description="the attack's price at the observed rate")


class AuditCard(BaseModel):
    """A query-only robustness audit of one endpoint (no weights)."""

    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["audit"] = "audit"
    endpoint: EndpointInfo
    eps: float = Field(ge=0, le=1, description="L∞ radius in pixel units [0, 1]")
    sample: Sample
    request: RequestShape
    clean_accuracy: Interval
    attacks: list[AttackResult]
    worst_case: Interval | None = Field(None, description="robust under every complete attack")
    traffic: Traffic
    command: str
    date: str = Field(description="UTC, ISO 8601")
    seed: int
    notes: list[str] = []


def card_schema() -> dict:
    return AuditCard.model_json_schema()


def write_schema(path: str | Path) -> None:
    Path(path).write_text(json.dumps(card_schema(), indent=2, ensure_ascii=False) + "\n")
