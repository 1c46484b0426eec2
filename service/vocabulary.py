"""The protocol vocabulary, written once: the two HTTP protocols and the v2 model's tensor names.

Light on purpose (no FastAPI, no torch): the routers, the OpenAPI patching and the HTTP client
all import it, so a client and the server cannot disagree on a name or a datatype.
"""

from __future__ import annotations

from typing import Literal, get_args

Protocol = Literal["v1", "v2"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)

# Open Inference Protocol v2: the model's one input and its outputs, name -> datatype.
V2_INPUT = "input"
V2_INPUT_DATATYPE = "FP32"
V2_PROBABILITIES = "probabilities"
V2_INDEX = "index"
V2_OUTPUTS: dict[str, str] = {V2_PROBABILITIES: "FP32", V2_INDEX: "INT64"}

# ``--output labels``: only the top-1 label, as the class name (BYTES) and its index; no probabilities.
V2_LABEL = "label"
V2_LABEL_OUTPUTS: dict[str, str] = {V2_LABEL: "BYTES", V2_INDEX: "INT64"}
