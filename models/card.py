"""The robustness card: what a served model resists, as measured by ``report`` or ``audit``, in one typed file.

A checkpoint directory may hold ``robustness.json``; the server shows it to clients
(``GET /v1/models/{name}/card``, a summary in ``/v1/models``, v2 model metadata ``parameters``).
It lives here, below both ``service`` (which reads cards) and ``probe`` (which writes them), so
both use one schema; its JSON Schema is published as ``docs/card.schema.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .regular_files import NotRegularFile, read_regular

CARD_FILE = "robustness.json"
CARD_VERSION = 1
Source = Literal["report", "audit"]


class CardError(ValueError):
    """A card that cannot be used; the message names the file and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Endpoint(_Strict):
    """The model the card describes, and where it was measured."""

    name: str = Field(..., description="the model's name (as served)")
    version: str | None = Field(None, description="the model version measured, where the server reports one")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="SHA-256 of model.safetensors, where known")
    url: str | None = Field(None, description="the endpoint attacked (audit); none for a report measured in process")
    protocol: Literal["v1", "v2"] | None = Field(
        None, description="the protocol the audit spoke: v2 (Open Inference Protocol) or this server's v1"
    )
    randomized: bool | None = Field(
        None, description="audit: two answers to one input differed (RCI, input noise, ...); none where not checked"
    )


class Queries(_Strict):
    """Queries an attack spent per image it broke (query attacks only)."""

    median: float = Field(..., ge=0)
    p90: float = Field(..., ge=0)


class Measurement(_Strict):
    """One attack (or the per-image worst case of several) at one ε under one serving setting."""

    attack: str = Field(
        ..., description="what attacked: one attack, or 'worst case of: …' listing the attacks taken per image"
    )
    threat: Literal["white-box", "score-based", "decision-based", "transfer"] = Field(
        ..., description="what the attacker could see or hold"
    )
    setting: str = Field(..., description="how the model was served, e.g. 'RCI off' or 'RCI request scope'")
    eps: float = Field(..., gt=0, description="L∞ radius in [0, 1] pixel units")
    sample: str = Field(..., description="the key of the images attacked in the card's samples")
    n: int = Field(..., ge=1, description="images attacked")
    robust_accuracy: float = Field(
        ..., ge=0, le=1, description="accuracy under attack (expected over the server's random draws where randomized)"
    )
    interval: tuple[float, float] = Field(..., description="95 % Wilson interval of robust_accuracy")
    draws: int = Field(1, ge=1, description="random draws each image was scored over (1: deterministic)")
    queries_per_broken: Queries | None = Field(None, description="queries per broken image (query attacks)")
    queries: int | None = Field(None, ge=0, description="queries sent in all (query attacks)")
    rate_limited: int = Field(0, ge=0, description="429 / 503 answers with Retry-After met (and waited out)")

    @model_validator(mode="after")
    def _interval_holds(self) -> Measurement:
        low, high = self.interval
        if not 0 <= low <= high <= 1:
            raise ValueError(f"interval {list(self.interval)} must satisfy 0 <= low <= high <= 1")
        return self


class Unfinished(_Strict):
    """An attack the card has no number for: skipped (it cannot run against this endpoint) or stopped early."""

    attack: str
    threat: Literal["white-box", "score-based", "decision-based", "transfer"]
    eps: float = Field(..., gt=0)
    status: Literal["incomplete", "skipped"]
    reason: str = Field(..., description="why: the stop reason (e.g. the query cap), or why it could not run")
    attacked: int = Field(0, ge=0, description="images attacked before it stopped")
    broken: int = Field(0, ge=0, description="of those, images broken")
    queries: int = Field(0, ge=0, description="queries sent before it stopped")


class Traffic(_Strict):
    """What the audit cost the endpoint: requests, the 429s and 503s met, the time waited on them, the rate seen."""

    queries: int = Field(..., ge=0)
    requests: int = Field(..., ge=0, description="HTTP requests sent, refused ones (and their retries) included")
    status_429: int = Field(0, ge=0)
    status_503: int = Field(0, ge=0)
    waited_s: float = Field(0.0, ge=0, description="seconds waited on Retry-After")
    wall_s: float = Field(..., ge=0, description="the audit's wall-clock seconds, resumed runs summed")
    queries_per_second: float | None = Field(None, ge=0)
    days_per_million_queries: float | None = Field(None, ge=0, description="an attack's price at the observed rate")


class AuditRun(_Strict):
    """How an audit (``source: audit``) queried the endpoint: what its metadata could not say, and what it cost."""

    input: str = Field(..., description="the input tensor sent: name, datatype, shape")
    pixel_scale: float = Field(..., gt=0, description="pixels were sent in [0, pixel_scale]")
    layout: str = Field(..., description="NCHW, NHWC or flat")
    class_order: list[int] | None = Field(None, description="the data set's class of each output (none: the same)")
    output: str = Field(..., description="how answers were read: logits, probabilities, label or auto")
    seed: int = Field(..., description="the class-balanced sample's and the attacks' seed")
    budget: int = Field(..., ge=1, description="queries per image per attack")
    votes: int = Field(..., ge=1, description="queries per candidate (majority vote against a randomized endpoint)")
    confirm: int = Field(
        ..., ge=0, description="fresh queries that all missed the label before an image counted broken"
    )
    traffic: Traffic
    unfinished: list[Unfinished] = Field(default_factory=list, description="attacks without a number, and why")


class WorstCase(_Strict):
    """The lowest robust accuracy the card records at one ε, over every attack and setting."""

    eps: float
    robust_accuracy: float
    interval: tuple[float, float]
    n: int
    attack: str
    setting: str


class RobustnessCard(_Strict):
    """A model's robustness card (``robustness.json``): every number with its interval, images and command."""

    card_version: Literal[1] = Field(1, description="this schema's version")
    source: Source = Field(
        ..., description="report: white-box and query attacks with the weights; audit: query-only, no weights"
    )
    model: Endpoint
    dataset: str = Field(..., description="the data set the images come from")
    eps: list[float] = Field(..., min_length=1, description="the ε values measured")
    samples: dict[str, list[int]] = Field(
        ...,
        description="the images attacked, by index into the data set's test split, under a key each measurement names",
    )
    measurements: list[Measurement] = Field(
        ..., description="every number; empty only for an audit whose attacks all stopped (audit.unfinished says why)"
    )
    clean_accuracy: float | None = Field(None, ge=0, le=1, description="accuracy without attack, where measured")
    rate_limited: int = Field(0, ge=0, description="429 / 503 answers met in all")
    output: Literal["scores", "labels"] = Field(
        "scores", description="what the endpoint answered: scores, or only its top-1 label"
    )
    notes: list[str] = Field(default_factory=list, description="what the numbers do and do not cover")
    audit: AuditRun | None = Field(None, description="how an audit queried the endpoint (source: audit)")
    command: str = Field(..., description="the command that measured it")
    date: str = Field(..., pattern=r"^\d{4}-\d{2}-\d{2}", description="when (ISO 8601 date)")

    @model_validator(mode="after")
    def _consistent(self) -> RobustnessCard:
        if not self.measurements and not (self.audit and self.audit.unfinished):
            raise ValueError("a card needs a measurement, or an audit's unfinished attacks saying why it has none")
        for m in self.measurements:
            if m.sample not in self.samples:
                raise ValueError(
                    f"measurement {m.attack!r} at eps {m.eps:g} names sample {m.sample!r}, which is not in samples ({', '.join(self.samples)})"
                )
            if m.eps not in self.eps:
                raise ValueError(
                    f"measurement {m.attack!r} at eps {m.eps:g}: eps not in the card's eps list {self.eps}"
                )
        return self

    def worst_cases(self) -> list[WorstCase]:
        """At each ε, the measurement with the lowest robust accuracy (ties: the narrower interval, then the first)."""
        out = []
        for eps in sorted(self.eps):
            rows = [m for m in self.measurements if m.eps == eps]
            if not rows:
                continue
            worst = min(rows, key=lambda m: (m.robust_accuracy, m.interval[1] - m.interval[0]))
            out.append(
                WorstCase(
                    eps=eps,
                    robust_accuracy=worst.robust_accuracy,
                    interval=worst.interval,
                    n=worst.n,
                    attack=worst.attack,
                    setting=worst.setting,
                )
            )
        return out

    def to_json(self) -> str:
        """The file's text (stable: sorted keys, two-space indent, one trailing newline)."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def card_schema() -> str:
    """The JSON Schema of ``RobustnessCard`` as published in ``docs/card.schema.json``."""
    return json.dumps(RobustnessCard.model_json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _problems(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:3]:
        loc = ".".join(map(str, e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def read_card(path: Path) -> RobustnessCard | None:
    """The card at ``path`` (None when there is no such file); ``CardError`` naming the file when it is not a valid card."""
    if not path.exists():
        return None
    try:
        raw = json.loads(read_regular(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CardError(f"{path}: not valid JSON ({exc})") from None
    except NotRegularFile as exc:
        raise CardError(str(exc)) from None
    except OSError as exc:
        raise CardError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not isinstance(raw, dict):
        raise CardError(f"{path}: a robustness card must be a JSON object")
    try:
        return RobustnessCard.model_validate(raw)
    except ValidationError as exc:
        raise CardError(f"{path}: not a valid robustness card (docs/card.schema.json): {_problems(exc)}") from None
