"""The service's own protocol (v1): JSON tensors, PNG/JPEG uploads, model list, health.

``/v1/predict`` and ``/v1/predict/image`` go to the default model; ``/v1/models/{name}/predict``
and its image route to the model (or alias) named. Every answer names the model that produced it.

Codec: ``/v1/predict`` takes ``{"inputs": [item, ...]}``; ``/v1/predict/image`` takes multipart
files whose size is read from the image header and refused above ``max_image_pixels`` *before*
decoding; decoding runs on the lifecycle's decode thread (Pillow and numpy only).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image, ImageOps
from starlette.datastructures import UploadFile

from codedsmooth.models.card import RobustnessCard
from codedsmooth.models.checkpoint import border_background
from codedsmooth.service.api.handlers import ServiceRoute
from codedsmooth.service.api.inputs import (
    check_batch,
    check_count,
    parse_json,
    require_content_type,
    require_identity_encoding,
    to_float_array,
)
from codedsmooth.service.api.openapi import INFER_ERRORS, errors, request_body, schema_ref
from codedsmooth.service.api.schemas import (
    CardSummary,
    HealthBody,
    ModelDetails,
    ModelInfo,
    Prediction,
    PredictRequest,
    PredictResponse,
    RciInfo,
    no_card,
)
from codedsmooth.service.errors import BadRequest, InvalidInput, NotFound, PayloadTooLarge, ServiceError, quoted
from codedsmooth.service.lifecycle import current_lifecycle

router = APIRouter(route_class=ServiceRoute)
IMAGE_FORMATS = ("PNG", "JPEG")


def json_response(body) -> Response:
    """Serialise a response model once (FastAPI would validate and encode it again); absent fields (None) are left out."""
    return Response(body.model_dump_json(exclude_none=True), media_type="application/json")


# ---- codec ------------------------------------------------------------------


def tensor_from_predict_body(payload: Any, input_shape, max_items: int, raw: bytes | None = None) -> torch.Tensor:
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise InvalidInput('body must be a JSON object with an "inputs" list')
    extra = [key for key in payload if key != "inputs"]
    if extra:
        raise InvalidInput(f'{len(extra)} unknown field(s) {quoted(extra)}; only "inputs" is accepted')
    inputs = payload["inputs"]
    if isinstance(inputs, list):
        check_count(len(inputs), max_items, "inputs")  # before building an array of a huge request
    return check_batch(to_float_array(inputs, raw=raw), input_shape, max_items)


def decode_images(
    images: list[tuple[str, bytes]], input_shape, max_pixels: int, background: tuple[float, ...] = (0.0,)
) -> np.ndarray:
    """PNG/JPEG files → (n, C, H, W) float32 in [0, 1]: upright, opaque, in the model's channels and H×W.

    Runs on the decode thread. The pixel count comes from the header (``Image.open`` is lazy);
    an image above ``max_pixels`` is refused before any pixel is decoded. Then, as image viewers
    show it: the EXIF orientation is applied, and transparent areas are composited onto
    ``background`` (the checkpoint's, a pixel value per channel in [0, 1]).
    """
    channels, height, width = input_shape
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for name, data in images:
        try:
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise PayloadTooLarge(
                        f"image {quoted(name)} is {w}x{h} = {w * h} pixels; at most {max_pixels} per image"
                    )
                if img.format == "JPEG":
                    side = max(width, height)  # the EXIF orientation may swap width and height
                    img.draft(mode, (side, side))  # decode at a reduced scale where JPEG allows it
                pixels = _opaque(ImageOps.exif_transpose(img), background)
                pixels = pixels.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
                arr = np.asarray(pixels, dtype=np.float32) / 255.0
        except ServiceError:
            raise
        except Image.DecompressionBombError:
            raise PayloadTooLarge(
                f"image {quoted(name)} is too large to decode; at most {max_pixels} pixels per image"
            ) from None
        except Exception as exc:  # noqa: BLE001 - any failure to decode an upload is the upload's fault
            raise InvalidInput(
                f"image {quoted(name)} cannot be decoded ({_decode_problem(exc)}); only PNG and JPEG are accepted"
            ) from None
        arrays.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
    return np.stack(arrays)


def background_warnings(arr: np.ndarray, background: tuple[float, ...]) -> list[str | None]:
    """Per decoded image (n, C, H, W in [0, 1]): a warning when its border is far from the checkpoint's background.

    A dark-on-light photo of a digit gets a confident wrong label from a model trained on light-on-dark
    digits (MNIST, Fashion-MNIST); the server never inverts an image, so it says what looks wrong instead.
    The border is measured as the checkpoint's own background is (``border_background``).
    """
    expected = float(np.mean(background))
    out: list[str | None] = []
    for border in _borders(arr):
        if abs(border - expected) <= 0.5:
            out.append(None)
            continue
        seen, wanted = ("light", "dark") if border > expected else ("dark", "light")
        out.append(
            f"the image's border is {seen} (mean {border:.2f}) but this model expects a {wanted} background "
            f"({expected:g}): it was trained on {seen} objects on a {wanted} background; invert the image "
            "(e.g. PIL.ImageOps.invert) before sending it, as the server never inverts one"
        )
    return out


def _borders(arr: np.ndarray) -> list[float]:
    """The median border pixel of each image, averaged over its channels (``border_background`` per image)."""
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    return [float(np.mean(border_background(x[i : i + 1]))) for i in range(len(x))]


def _opaque(img: Image.Image, background: tuple[float, ...]) -> Image.Image:
    """``img`` with its transparent areas (alpha channel or transparent palette entry) composited onto ``background``."""
    if "A" not in img.getbands() and "transparency" not in img.info:
        return img
    fill = tuple(round(255 * v) for v in (background * 3 if len(background) == 1 else background)[:3])
    return Image.alpha_composite(Image.new("RGBA", img.size, (*fill, 255)), img.convert("RGBA"))


def _decode_problem(exc: Exception) -> str:
    """What is wrong with an upload, in the service's words (Pillow's own texts are not for clients)."""
    text = str(exc)
    if "cannot identify" in text:
        return "not a PNG or JPEG image"
    if "truncated" in text or isinstance(exc, EOFError):
        return "the file is truncated"
    return "the file is corrupt"


def _multipart_problem(message: str, max_items: int) -> ServiceError:
    """What is wrong with a multipart body the form parser refused, in the service's words."""
    if "Too many files" in message:
        return PayloadTooLarge(f"too many files; at most {max_items} images per request")
    if "Too many fields" in message:
        return PayloadTooLarge(f'too many form fields; send at most {max_items} images in fields named "files"')
    if "maximum size" in message:
        return PayloadTooLarge("a form field that is not a file is too large; send images as files")
    if "boundary" in message:
        return BadRequest("multipart body without a boundary in its Content-Type")
    if "Content-Disposition" in message:
        return BadRequest("a multipart part without a name in its Content-Disposition")
    return BadRequest("body is not valid multipart/form-data")


def _predictions(probs: np.ndarray, classes: list[str], output: str = "scores") -> list[Prediction]:
    """One prediction per item; with ``output == "labels"`` the top-1 label and its index only (no probabilities)."""
    idx = probs.argmax(1).tolist()
    if output == "labels":
        return [Prediction(label=classes[i], index=i) for i in idx]
    return [Prediction(label=classes[i], index=i, probabilities=p) for i, p in zip(idx, probs.tolist())]


# ---- health -----------------------------------------------------------------


@router.get("/health/live", response_model=HealthBody, tags=["health"])
async def live(request: Request):
    """200 while the process runs (status ``draining`` during shutdown)."""
    return HealthBody(status="draining" if current_lifecycle(request).draining else "ok")


@router.get(
    "/health/ready",
    response_model=HealthBody,
    responses={503: {"model": HealthBody, "description": "loading or draining; retry after Retry-After seconds"}},
    tags=["health"],
)
async def ready(request: Request):
    """200 once the model is loaded and warm; 503 while loading or draining."""
    lc = current_lifecycle(request)
    if lc.ready:
        return HealthBody(status="ok")
    return JSONResponse(
        {"status": "draining" if lc.draining else "loading"}, status_code=503, headers={"Retry-After": "2"}
    )


# ---- models and prediction --------------------------------------------------


def _model_info(lc, model) -> ModelInfo:
    ck = model.checkpoint
    details = None
    if lc.settings.expose_model_details:
        details = ModelDetails(
            method=ck.config.method,
            dataset=ck.config.dataset,
            test_accuracy=ck.config.test_accuracy,
            target_block=ck.target_block,
        )
    return ModelInfo(
        name=model.name,
        input_shape=list(ck.input_shape),
        classes=ck.classes,
        rci=RciInfo.from_spec(model.engine.spec),
        details=details,
        output=model.settings.output,
        card=CardSummary.of(model.name, ck.card),
        checkpoint_sha256=ck.sha256,
    )


@router.get("/v1/models", response_model=list[ModelInfo], responses=errors(503), tags=["v1"])
async def models(request: Request):
    """The served models: name, input shape, classes, the RCI coding spec, what answers carry and the robustness card's worst cases (training details with --expose-model-details)."""
    lc = current_lifecycle(request)
    lc.require_ready()
    infos = [_model_info(lc, m).model_dump_json(exclude_none=True) for m in lc.repository.serving()]
    return Response(f"[{','.join(infos)}]", media_type="application/json")


@router.get("/v1/models/{name}/card", response_model=RobustnessCard, responses=errors(404, 503), tags=["v1"])
async def model_card(name: str, request: Request):
    """The robustness card of the model or alias `name` (robustness.json in its checkpoint directory, schema docs/card.schema.json); 404 when it has none."""
    model = current_lifecycle(request).describe_model(name)
    card = model.checkpoint.card
    if card is None:
        raise NotFound(no_card(model.name))
    return Response(card.model_dump_json(), media_type="application/json")


async def _predict(request: Request, name: str | None) -> Response:
    lc = current_lifecycle(request)
    lc.require_ready()
    require_content_type(request.headers.get("content-type"), "application/json")
    require_identity_encoding(request.headers.get("content-encoding"))
    model = lc.use_model(request, name)
    raw = await request.body()
    ck, max_items = model.checkpoint, model.settings.max_items_per_request
    assert max_items is not None  # validated settings have it (max_batch_size by default)
    x = tensor_from_predict_body(parse_json(raw, ck.input_shape, max_items), ck.input_shape, max_items, raw=raw)
    probs = await lc.infer(request, x, model)
    return json_response(
        PredictResponse(
            model=model.name,
            predictions=_predictions(probs, ck.classes, model.settings.output),
            rci=RciInfo.from_spec(model.engine.spec).summary(),
        )
    )


PREDICT_DOC = request_body({"application/json": schema_ref(PredictRequest)})


@router.post(
    "/v1/predict", response_model=PredictResponse, responses=INFER_ERRORS, tags=["v1"], openapi_extra=PREDICT_DOC
)
async def predict(request: Request):
    """Classify tensors with the default model: `inputs` is a list of items of the model's input shape, raw pixels in [0, 1]."""
    return await _predict(request, None)


@router.post(
    "/v1/models/{name}/predict",
    response_model=PredictResponse,
    responses={**errors(404), **INFER_ERRORS},
    tags=["v1"],
    openapi_extra=PREDICT_DOC,
)
async def predict_model(name: str, request: Request):
    """Classify tensors with the model or alias `name` (the answer's `model` names the one that ran)."""
    return await _predict(request, name)


IMAGE_BODY = {
    "type": "object",
    "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "PNG or JPEG images"}
    },
    "required": ["files"],
}
IMAGE_DOC = request_body({"multipart/form-data": IMAGE_BODY})


async def _predict_image(request: Request, name: str | None) -> Response:
    lc = current_lifecycle(request)
    lc.require_ready()
    require_content_type(request.headers.get("content-type"), "multipart/form-data")
    require_identity_encoding(request.headers.get("content-encoding"))
    model = lc.use_model(request, name)
    ck, max_items = model.checkpoint, model.settings.max_items_per_request
    assert max_items is not None  # validated settings have it (max_batch_size by default)
    try:
        form = await request.form(max_files=max_items, max_fields=16)
    except ServiceError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed multipart
        raise _multipart_problem(str(getattr(exc, "detail", exc)), max_items) from None
    try:
        uploads = [f for f in form.getlist("files") + form.getlist("file") if isinstance(f, UploadFile)]
        if not uploads:
            raise InvalidInput('send at least one image in a multipart field named "files"')
        check_count(len(uploads), max_items, "images")
        images = [(f.filename or "upload", await f.read()) for f in uploads]
    finally:
        await form.close()
    arr = await lc.decode(decode_images, images, ck.input_shape, lc.settings.max_image_pixels, ck.background)
    x = check_batch(arr, ck.input_shape, max_items, what="images")
    probs = await lc.infer(request, x, model)
    predictions = _predictions(probs, ck.classes, model.settings.output)
    for prediction, warning in zip(predictions, background_warnings(arr, ck.background)):
        if warning is not None:
            prediction.warnings = [warning]
    return json_response(
        PredictResponse(
            model=model.name,
            predictions=predictions,
            rci=RciInfo.from_spec(model.engine.spec).summary(),
        )
    )


@router.post(
    "/v1/predict/image", response_model=PredictResponse, responses=INFER_ERRORS, tags=["v1"], openapi_extra=IMAGE_DOC
)
async def predict_image(request: Request):
    """Classify PNG/JPEG images (multipart field `files`) with the default model, resized and converted as its checkpoint needs."""
    return await _predict_image(request, None)


@router.post(
    "/v1/models/{name}/predict/image",
    response_model=PredictResponse,
    responses={**errors(404), **INFER_ERRORS},
    tags=["v1"],
    openapi_extra=IMAGE_DOC,
)
async def predict_model_image(name: str, request: Request):
    """Classify PNG/JPEG images (multipart field `files`) with the model or alias `name`."""
    return await _predict_image(request, name)
