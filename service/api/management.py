"""The model repository extension of the Open Inference Protocol (Triton's names): index, load, unload.

``POST /v2/repository/index`` lists every model of the repository with its state (``READY``,
``LOADING``, ``UNLOADING``, ``UNAVAILABLE`` with a reason); ``{"ready": true}`` lists the ready ones
only. With ``--model-control explicit``, ``POST /v2/repository/models/{name}/load`` loads (or
reloads, as a new version swapped in without a failed request) the checkpoint directory ``name``
of the repository, validated as at start-up (a broken one: 400 naming the file, the other models
keep serving), and ``…/unload`` stops routing to it, lets its accepted requests finish, then frees
it. Without it both answer 403, and so do they, with API keys, for a client whose line in the keys
file lacks ``manage=yes`` (the index is open to every client; a failed load's reason carries the
server's paths only for ``manage=yes`` clients, for the others and without API keys it names files
relative to the repository). The work is ``repository.Repository``'s.

Where the load or unload runs is the app's ``model_control`` (``app.state``): by default this
process's repository (:func:`apply`); under Ray Serve, every replica's (``ray.serve``
broadcasts :func:`apply` to each replica live at the call), so a load or unload reaches every
replica, and the answer is an error if any replica's was.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from codedsmooth.service.access.control import CLIENT
from codedsmooth.service.api.handlers import ServiceRoute
from codedsmooth.service.api.inputs import parse_json
from codedsmooth.service.api.openapi import errors
from codedsmooth.service.api.schemas import V2RepositoryModel
from codedsmooth.service.errors import Forbidden, InvalidInput, ServiceError
from codedsmooth.service.lifecycle import current_lifecycle
from codedsmooth.service.repository.registry import UNLOADED

router = APIRouter(route_class=ServiceRoute, tags=["v2 repository"])


@router.post("/v2/repository/index", response_model=list[V2RepositoryModel], responses=errors(400, 413, 422, 503))
async def index(request: Request):
    """Every model of the repository and its state; body ``{"ready": true}``: the ready ones only."""
    lc = current_lifecycle(request)
    lc.require_ready()
    raw = await request.body()
    body = parse_json(raw, (1,), 1) if raw.strip() else {}
    ready = body.get("ready", False) if isinstance(body, dict) else None
    if not isinstance(ready, bool):
        raise InvalidInput('body must be empty or {"ready": true|false}')
    client = request.scope["state"].get(CLIENT)
    entries = lc.repository.index(
        paths=client is not None and client.manage
    )  # server paths for management clients only
    return JSONResponse([e for e in entries if e["state"] == "READY"] if ready else entries)


def _allowed(request: Request):
    """The lifecycle, when this server allows model control and (with API keys) the client may use it; 403 otherwise."""
    lc = current_lifecycle(request)
    lc.require_ready()
    if not lc.repository.explicit:
        raise Forbidden(
            "model control is off: start the server with --model-repository DIR --model-control explicit to load and unload models"
        )
    if lc.access is not None:  # keys required: the admission has set the client, which must have manage=yes
        client = request.scope["state"].get(CLIENT)
        if client is None or not client.manage:
            who = f"client {client.name!r}" if client is not None else "this request"
            raise Forbidden(f"{who} may not load or unload models: its line in the keys file needs manage=yes")
    return lc


def _entry(lc, name: str) -> dict:
    """``name``'s index entry; a model unloaded after its directory was removed is in the index no more."""
    return next(
        (e for e in lc.repository.index() if e["name"] == name),
        {"name": name, "state": "UNAVAILABLE", "reason": UNLOADED},
    )


ACTIONS = ("load", "unload")


async def apply(lc, action: str, name: str) -> dict:
    """Load or unload ``name`` in this process's repository: ``{"entry": index entry}`` or ``{"error": {status, message}}``
    (data, not an exception, so that it crosses a process boundary as it is)."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
    try:
        await (lc.repository.load(name) if action == "load" else lc.repository.unload(name))
    except ServiceError as exc:
        return {"error": {"status": exc.status, "message": exc.message, "headers": dict(exc.headers or {})}}
    finally:
        lc.update_ready()
    return {"entry": _entry(lc, name)}


async def local_control(request: Request, action: str, name: str) -> list[dict]:
    """The default model control: this process only."""
    return [await apply(current_lifecycle(request), action, name)]


async def _control(request: Request, action: str, name: str) -> JSONResponse:
    lc = _allowed(request)
    control = getattr(request.app.state, "model_control", None) or local_control
    results = await control(request, action, name)
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        first = failed[0]
        more = f" (on {len(failed)} of {len(results)} replicas)" if len(results) > 1 else ""
        raise ServiceError(first["message"] + more, headers=first["headers"] or None, status=first["status"])
    return JSONResponse(_entry(lc, name))


@router.post(
    "/v2/repository/models/{name}/load", response_model=V2RepositoryModel, responses=errors(400, 403, 404, 503)
)
async def load(name: str, request: Request):
    """Load (or reload as a new version) the checkpoint directory ``name`` of the repository (under Ray Serve: on every replica)."""
    return await _control(request, "load", name)


@router.post("/v2/repository/models/{name}/unload", response_model=V2RepositoryModel, responses=errors(403, 404, 503))
async def unload(name: str, request: Request):
    """Stop routing to ``name``, let its accepted requests finish, then free it (under Ray Serve: on every replica)."""
    return await _control(request, "unload", name)
