"""The OpenAPI document, patched in one place.

Routes that parse their own bodies (to give precise errors, and for the v2 binary extension)
declare them with :func:`request_body`; their schemas are added to the components here. FastAPI's
automatic 422 ``HTTPValidationError`` entries are dropped: path parameters are plain strings that
cannot fail validation, and every error the server sends is ``{"error": "..."}`` (declared per route;
its message is cut to ``errors.MAX_ERROR_CHARS``). Paths are exact: a trailing slash is 404, never a redirect.
With API keys required, the document declares the bearer scheme, and every operation off the open
paths (``access.OPEN_PATHS``) lists it and its 401 (the predict operations also 429).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from codedsmooth.service.access.control import OPEN_PATHS
from codedsmooth.service.api.schemas import ErrorBody

_EXTRA_SCHEMAS: dict[str, Any] = {}

ERROR_DESCRIPTIONS = {
    400: "unparseable body (JSON, multipart) or header",
    401: "no API key, or an unknown one (WWW-Authenticate: Bearer)",
    403: "not allowed by the server's configuration (model load/unload needs --model-control explicit)",
    404: "unknown model or version",
    408: "the body did not arrive within the body timeout (the connection closes)",
    413: "body, item count or image size too large, or more JSON values than the most items per request can hold",
    415: "wrong content type, or a compressed body (any Content-Encoding but identity)",
    422: "invalid input (shape, datatype, values, names)",
    429: "over the API key's rate limit or quota; retry after Retry-After seconds",
    503: "not ready, queue full or draining; retry after Retry-After seconds",
    504: "no answer within the request deadline",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for these error statuses, each with the JSON error body."""
    return {code: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


INFER_ERRORS = errors(400, 408, 413, 415, 422, 503, 504)


def schema_ref(model) -> dict:
    """A ``$ref`` to the JSON schema of ``model`` (added to the document's components)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    _EXTRA_SCHEMAS.update(schema.pop("$defs", {}))
    _EXTRA_SCHEMAS[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def request_body(content: dict[str, dict]) -> dict:
    """``openapi_extra`` for a route that reads its body itself: ``{media type: schema}``."""
    return {
        "requestBody": {"required": True, "content": {media: {"schema": schema} for media, schema in content.items()}}
    }


def install_openapi(app: FastAPI, keys_required: bool = False) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(_EXTRA_SCHEMAS)
            _drop_validation_errors(doc)
            if keys_required:
                _require_keys(doc)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to replace the schema


def _drop_validation_errors(doc: dict) -> None:
    for path in doc.get("paths", {}).values():
        for operation in path.values():
            response = operation.get("responses", {}).get("422")
            if response and "HTTPValidationError" in str(response):
                del operation["responses"]["422"]
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


BEARER = "apiKey"


def _require_keys(doc: dict) -> None:
    doc["components"].setdefault("securitySchemes", {})[BEARER] = {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key from the server's keys file: Authorization: Bearer <key>",
    }
    for path, operations in doc.get("paths", {}).items():
        if path in OPEN_PATHS:
            continue
        for operation in operations.values():
            operation["security"] = [{BEARER: []}]
            responses = operation.setdefault("responses", {})
            codes = (
                (401, 429) if "504" in responses else (401,)
            )  # items are charged where a deadline applies: the predict routes
            for code, entry in errors(*codes).items():
                responses[str(code)] = {
                    "description": entry["description"],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                }
