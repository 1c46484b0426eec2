"""Request and response bodies (pydantic), for validation where cheap and for the OpenAPI document."""

from __future__ import annotations

from typing import Any, Literal, cast

from pydantic import BaseModel, Field, StrictInt, StrictStr

from codedsmooth.core.spec import CodedPointKind, CodingSpec, DataPointKind, Scope
from codedsmooth.models.card import RobustnessCard, WorstCase

Output = Literal["scores", "labels"]


class ErrorBody(BaseModel):
    error: str = Field(..., description="what is wrong")


class PredictRequest(BaseModel):
    inputs: list[list[list[list[float]]]] = Field(
        ...,
        description="items, each a tensor of the model's input shape [C, H, W] as nested lists of raw pixels in [0, 1]",
        min_length=1,
    )


class RciSummary(BaseModel):
    """What a prediction says about its coding; the whole spec is in ``GET /v1/models``."""

    enabled: bool = Field(..., description="whether randomized coded inference ran")
    scope: Scope = Field(..., description="request: coded with trusted filler only; batch: coded with the micro-batch")


class RciInfo(RciSummary):
    """The public view of a ``codedsmooth.core.CodingSpec``: the one mapping between the two, both ways.

    Public on purpose (``GET /v1/models``, v2 model metadata): the defence is the per-request
    random draw from the OS CSPRNG, not the secrecy of the code; an adaptive attacker is assumed
    to know the spec, and the attack client (``codedsmooth attack --url``) builds it from here.
    """

    group_size: int = Field(..., description="K: items per coding group")
    coded_points: int = Field(..., description="N: coded samples per coding group")
    data_point_kind: str = Field(..., description="where the K items sit on [-1, 1]")
    coded_point_kind: str = Field(..., description="where the N coded samples sit on [-1, 1]")
    decode_tolerance: float = Field(
        ..., description="request scope: decoder weights below this are skipped (0: full decode)"
    )

    @staticmethod
    def from_spec(spec: CodingSpec) -> RciInfo:
        return RciInfo(
            enabled=spec.enabled,
            scope=spec.scope,
            group_size=spec.k,
            coded_points=spec.n,
            data_point_kind=spec.data_points,
            coded_point_kind=spec.coded_points,
            decode_tolerance=spec.decode_tolerance,
        )

    def to_spec(self) -> CodingSpec:
        """The spec a server reports (validated as any spec: a client refuses a code it cannot build)."""
        return CodingSpec(
            enabled=self.enabled,
            scope=self.scope,
            k=self.group_size,
            n=self.coded_points,
            data_points=cast(DataPointKind, self.data_point_kind),  # a string off the wire: CodingSpec checks it
            coded_points=cast(CodedPointKind, self.coded_point_kind),
            decode_tolerance=self.decode_tolerance,
        )

    def summary(self) -> RciSummary:
        return RciSummary(enabled=self.enabled, scope=self.scope)


class Prediction(BaseModel):
    label: str
    index: int
    probabilities: list[float] | None = Field(
        None, description="class probabilities by index; absent when the server answers labels only (--output labels)"
    )
    warnings: list[str] | None = Field(
        None,
        description="image route only: why the answer may be wrong (e.g. a light background where the model "
        "expects a dark one); absent when nothing looks wrong",
    )


class PredictResponse(BaseModel):
    model: str
    predictions: list[Prediction]
    rci: RciSummary


class ModelDetails(BaseModel):
    """How the model was made: shown only with ``--expose-model-details`` (it helps an attacker pick a transfer model)."""

    method: str = Field(..., description="training method (erm, mixup, coded, pgd-at, coded-at)")
    dataset: str = Field(..., description="the data set it was trained on")
    test_accuracy: float | None = Field(
        None, description="accuracy on that data set's test split (absent when not measured)"
    )
    target_block: str = Field(..., description="the block RCI codes through")


class CardSummary(BaseModel):
    """What ``GET /v1/models`` says of a model's robustness card: its worst case at each ε, or that it has none."""

    available: bool = Field(
        ..., description="whether the model has a robustness card (robustness.json in its checkpoint directory)"
    )
    note: str | None = Field(None, description="when there is no card: saying so")
    href: str | None = Field(None, description="where the whole card is: GET /v1/models/{name}/card")
    source: Literal["report", "audit"] | None = Field(
        None, description="what measured it: report (with the weights) or audit (query-only)"
    )
    date: str | None = Field(None, description="when it was measured")
    worst_case: list[WorstCase] | None = Field(
        None,
        description="at each ε, the lowest robust accuracy of the card, with its 95 % Wilson interval, images, attack and setting",
    )

    @staticmethod
    def of(name: str, card: RobustnessCard | None) -> CardSummary:
        if card is None:
            return CardSummary(available=False, note=no_card(name))
        return CardSummary(
            available=True,
            href=f"/v1/models/{name}/card",
            source=card.source,
            date=card.date,
            worst_case=card.worst_cases(),
        )


def no_card(name: str) -> str:
    return f"model {name!r} has no robustness card"


class ModelInfo(BaseModel):
    """What a client needs to call the model; training details only when the operator opts in."""

    name: str
    input_shape: list[int] = Field(..., description="[C, H, W] of one item")
    classes: list[str] = Field(..., description="labels, by output index")
    rci: RciInfo
    details: ModelDetails | None = Field(None, description="only with --expose-model-details")
    output: Output = Field(
        ..., description="what answers carry: scores (probabilities) or labels (the top-1 label only)"
    )
    card: CardSummary = Field(
        ..., description="the robustness card's worst case at each ε, or a note that there is none"
    )
    checkpoint_sha256: str | None = Field(
        None, description="SHA-256 of the checkpoint's model.safetensors: the exact weights served"
    )


class HealthBody(BaseModel):
    status: Literal["ok", "loading", "draining"]


# Open Inference Protocol v2 -------------------------------------------------


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelParameters(BaseModel):
    """The protocol's extension point: the coding spec in force and the model's robustness card."""

    rci: RciInfo = Field(..., description="the coding spec in force")
    card: RobustnessCard | None = Field(
        ..., description="the robustness card (as GET /v1/models/{name}/card); null when the model has none"
    )
    checkpoint_sha256: str | None = Field(
        None, description="SHA-256 of the checkpoint's model.safetensors: the exact weights served"
    )


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]
    parameters: V2ModelParameters


class V2InferInput(BaseModel):
    name: StrictStr
    shape: list[StrictInt] = Field(..., description="integers (JSON booleans are refused)")
    datatype: StrictStr
    parameters: dict[str, Any] | None = None
    data: Any = None


class V2RequestedOutput(BaseModel):
    name: StrictStr
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    id: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2InferInput] = Field(..., min_length=1)
    outputs: list[V2RequestedOutput] | None = None


class V2InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2InferOutput]


class V2RepositoryModel(BaseModel):
    """One model of the repository index (Triton's repository extension)."""

    name: str
    version: str | None = Field(None, description="the loaded version (counts loads); absent when not loaded")
    state: Literal["READY", "LOADING", "UNLOADING", "UNAVAILABLE"]
    reason: str | None = Field(None, description="UNAVAILABLE: why (unloaded, or why its last load failed)")
