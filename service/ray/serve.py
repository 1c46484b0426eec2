"""Serving on Ray Serve: the same FastAPI app, one engine per replica, behind Ray Serve's HTTP proxy.

``codedsmooth serve --replicas N [--ray-address ADDR]`` runs :func:`run_ray_serve`. Each replica
builds the app with :func:`codedsmooth.service.http.app.create_app` (lifecycle, engine, micro-batcher,
v1 and v2 routers, error mapping), so every route, status code and error body is the plain
server's; Ray Serve's FastAPI ingress runs the app's lifespan in the replica (model load and
warm-up at start, the lifecycle's drain at stop).

- **Replicas and resources.** ``--replicas N`` fixed replicas, or an autoscaling range
  (``--min-replicas``/``--max-replicas``, ``--replicas`` is then the initial count) aiming at
  ``--target-ongoing-requests`` per replica. Each replica reserves ``--num-cpus`` and
  ``--num-gpus`` of Ray's resources; torch gets ``--threads`` (default: ``--num-cpus``) threads,
  and with GPUs Ray sets ``CUDA_VISIBLE_DEVICES`` so ``cuda`` is the replica's own GPU.
- **Host and port** are the Ray Serve HTTP proxy's. Timeouts, limits and RCI options keep
  their meaning inside each replica; the proxy (not the replica) holds client connections, so
  ``--max-connections``, ``--header-timeout-s``, ``--max-header-bytes`` and ``--max-headers``
  are not enforced under Ray, and ``--keep-alive-s`` becomes the proxy's keep-alive. Ray Serve
  2.60's proxy (uvicorn with httptools) bounds neither the size nor the count of request
  headers nor the time to send them, and its ``HTTPOptions`` offer no such setting; its
  experimental HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY=1``, head bounded by
  ``RAY_SERVE_HAPROXY_TUNE_BUFSIZE``, 16 KiB) replaces the proxy and the middleware below and
  answers its own errors in HTML, so it is not used here. A public deployment puts a reverse
  proxy with header limits in front (see the README).
- **Metrics.** Each replica serves its own Prometheus registry on its own listener at
  ``--metrics-host:(--metrics-port + the replica's rank on its node)`` (0: any free port), every
  sample labelled ``replica``, ``deployment`` and ``app``. The address is logged by the replica.
- **RCI.** Request scope codes each request with the replica's own filler and OS randomness:
  the same semantics on every replica. Batch scope couples only the requests the proxy routed to
  the same replica within one micro-batch window.
- **Shutdown.** On SIGTERM/SIGINT every replica's lifecycle drains (new requests 503 +
  ``Retry-After``, accepted ones finish within ``--drain-timeout-s``), then the application is
  deleted (attached cluster) or Serve and the local Ray stop. Replicas Ray stops on its own
  (downscaling, ``serve.shutdown``) wait for their ongoing requests (``graceful_shutdown_timeout_s``
  = the drain timeout) and then run the same drain.
- **API keys and limits.** Each replica checks keys against ``--api-keys-file`` (read and
  re-read by each replica: the path must hold the same file on every node), and all replicas
  charge one set of per-client counters in a named Ray actor (``codedsmooth.service.access.shared_limits``), so
  ``--rate-limit`` and ``--quota`` hold for the deployment as a whole.
- **A model repository** (``--model-repository``): every replica serves the whole repository,
  read from the same path (on a multi-node cluster the path must hold the same directory on
  every node). With ``--model-control explicit`` a load or unload request reaches one replica
  through the proxy, which broadcasts it to every replica live at that moment (this one
  included) and answers only when all have done it (an error if any replica's was). A replica
  started later (autoscaling, or replacing one that died) loads the repository as it is on disk
  at its start: it does not replay earlier unloads, so remove a model's directory when you
  unload it for good.
- **A replica that dies** with requests on it: Ray's proxy would answer them 500 with an empty
  body; :func:`proxy_middlewares` (installed through Ray's proxy callback, set up automatically for
  a local cluster) answers them ``503 + Retry-After`` with the JSON error body instead, so a client
  sees the same contract as on a draining server and may retry.

This module and ``codedsmooth.service.access.shared_limits`` import ray; nothing else in ``codedsmooth`` imports it (``pip install -e '.[ray]'``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING

from ray import serve

from codedsmooth.service.settings import ServeSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("codedsmooth.ray")

APP_NAME = "codedsmooth"
DEPLOYMENT_NAME = "CodedSmooth"
PROXY_CALLBACK = "codedsmooth.service.ray.serve.proxy_middlewares"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"


def replica_settings(settings: ServeSettings) -> ServeSettings:
    """What a replica runs with: torch threads default to the replica's reserved CPUs (not the host's)."""
    threads = settings.threads or max(1, int(settings.num_cpus))
    return settings.model_copy(update={"threads": threads})


@serve.ingress()  # the app is built in the replica by __serve_build_asgi_app__
class CodedSmoothReplica:
    """One replica: one lifecycle, engine and micro-batcher, and its own metrics listener."""

    app: FastAPI  # set by serve.ingress's wrapper, from __serve_build_asgi_app__

    def __init__(self, settings: dict):
        # Every field is given, so the replica's own CODEDSMOOTH_* env vars do not change anything.
        self.settings = ServeSettings(**settings)
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id
        self.labels = {"replica": self.replica, "deployment": ctx.deployment, "app": ctx.app_name}
        self.local_rank = getattr(getattr(ctx, "rank", None), "local_rank", 0) or 0
        _tag_log_records(self.replica)  # log lines name the replica
        logging.basicConfig(
            level=self.settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s [replica %(replica)s]: %(message)s",
        )
        self._metrics_listener = None
        self.metrics_address: str | None = None

    def __serve_build_asgi_app__(self):
        from codedsmooth.service.http.app import create_app
        from codedsmooth.service.metrics import Metrics, start_metrics_listener

        metrics = Metrics()
        s = self.settings
        port = s.metrics_port + self.local_rank if s.metrics_port else 0
        try:
            self._metrics_listener = start_metrics_listener(metrics, s.metrics_host, port, labels=self.labels)
        except OSError as exc:  # the rank's port is taken (e.g. by a replica still stopping): any free port
            log.warning("metrics port %d unavailable (%s); using a free port", port, exc)
            self._metrics_listener = start_metrics_listener(metrics, s.metrics_host, 0, labels=self.labels)
        self.metrics_address = f"{s.metrics_host}:{self._metrics_listener.server_port}"
        log.info("replica %s (rank %d on this node) starting", self.replica, self.local_rank)
        limiter = None
        if s.api_keys_file:
            from codedsmooth.service.access.shared_limits import SharedLimiter

            limiter = SharedLimiter()
        app = create_app(s, metrics=metrics, limiter=limiter)  # the wrapper keeps it as ``self.app``
        if s.model_repository is not None and s.model_control == "explicit":
            app.state.model_control = broadcast_model_control
        return app

    async def model_control(self, action: str, name: str) -> dict:
        """Load or unload ``name`` in this replica's repository (broadcast to every replica by :func:`broadcast_model_control`)."""
        from codedsmooth.service.api.management import apply

        return {**await apply(self.app.state.lifecycle, action, name), "replica": self.replica}

    async def drain(self) -> dict:
        """Drain this replica's lifecycle: 503 to new requests, accepted ones finish (called on shutdown)."""
        lifecycle = self.app.state.lifecycle
        finished = await lifecycle.drain()
        return {"replica": self.replica, "finished": finished, "answered": lifecycle.metrics.status_counts()}

    def info(self) -> dict:
        return {"replica": self.replica, "metrics": self.metrics_address, "phase": self.app.state.lifecycle.phase}

    async def __del__(self):
        try:
            await super().__del__()  # the ASGI lifespan shutdown: lifecycle.stop(), i.e. the drain
        finally:
            if self._metrics_listener is not None:
                self._metrics_listener.shutdown()


async def broadcast_model_control(request, action: str, name: str) -> list[dict]:
    """``management``'s model control under Ray Serve: the load or unload runs on every replica live at the call
    (this one included), each from the repository directory at the same path, and every replica's result comes back."""
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, APP_NAME)
    results = await handle.broadcast("model_control", action, name).results_async(return_exceptions=True)
    return [
        r
        if isinstance(r, dict)
        else {
            "error": {
                "status": 503,
                "message": f"a replica did not answer the {action} of {name!r}: {type(r).__name__}",
                "headers": {"Retry-After": "1"},
            }
        }
        for r in results
    ]


def _tag_log_records(replica: str) -> None:
    old = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = old(*args, **kwargs)
        record.replica = replica
        return record

    logging.setLogRecordFactory(factory)


def deployment_options(settings: ServeSettings) -> dict:
    s = settings
    options: dict = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        # Each replica admits up to its own queue; beyond that Ray's router holds requests.
        "max_ongoing_requests": s.max_queue_size,
        # Ray waits this long for ongoing requests before the replica's own drain; then it is killed.
        "graceful_shutdown_timeout_s": s.drain_timeout_s + 5.0,
        "graceful_shutdown_wait_loop_s": 0.1,
    }
    if s.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": s.min_replicas,
            "initial_replicas": s.replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests or s.max_batch_size,
        }
    else:
        options["num_replicas"] = s.replicas
    return options


def build_app(settings: ServeSettings):
    """The Ray Serve application (``serve.run(build_app(settings), name=APP_NAME)``)."""
    s = replica_settings(settings)
    deployment = serve.deployment(CodedSmoothReplica)  # a Deployment: ray's stubs type only the decorator-factory call
    return deployment.options(**deployment_options(s)).bind(json.loads(s.model_dump_json()))  # type: ignore[attr-defined]


# ---- the HTTP proxy side -------------------------------------------------------------------


class ReplicaLostMiddleware:
    """In Ray's HTTP proxy: a request whose replica died before answering gets 503 + Retry-After (JSON).

    Ray's proxy answers such a request (``RayActorError``) with nothing, which uvicorn turns into a
    text/plain 500. Only requests that got no response at all are touched (on a shared cluster:
    those of every application behind this proxy).
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:
                raise
            logging.getLogger("codedsmooth.ray").warning("request failed in the proxy before an answer", exc_info=True)
        if not started:
            body = json.dumps({"error": "the replica serving this request stopped; retry"}).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})


def proxy_middlewares():
    """Ray Serve's HTTP proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLostMiddleware)]


# ---- the command ---------------------------------------------------------------------------


def start_ray(settings: ServeSettings) -> bool:
    """Join ``--ray-address`` or start a local Ray; returns whether this process started it."""
    import ray

    if ray.is_initialized():
        return False
    if settings.ray_address:
        ray.init(address=settings.ray_address)
        return False
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)  # inherited by the local cluster's proxy
    ray.init(address="local", include_dashboard=False)  # always a new one (``--ray-address auto`` joins a running one)
    return True


def start_serve(settings: ServeSettings):
    serve.start(
        http_options={
            "host": settings.host,
            "port": settings.port,
            "keep_alive_timeout_s": max(1, round(settings.keep_alive_s)),
        }
    )
    # Ray's per-request access log only at debug: the replicas' metrics count every request.
    logging_config = {"enable_access_log": settings.log_level.lower() == "debug"}
    return serve.run(build_app(settings), name=APP_NAME, route_prefix="/", logging_config=logging_config)


def drain_replicas(handle, timeout_s: float) -> list:
    """Every replica drains its lifecycle (503 to new requests, accepted ones finish)."""
    try:
        return handle.broadcast("drain").results(timeout_s=timeout_s, return_exceptions=True)
    except Exception as exc:  # noqa: BLE001 - shutting down anyway
        log.warning("replica drain did not complete: %s", exc)
        return []


def run_ray_serve(settings: ServeSettings) -> int:
    import ray

    t0 = time.monotonic()
    started_ray = start_ray(settings)
    limits_actor = None
    t_ray = time.monotonic() - t0
    stop = threading.Event()  # handlers after ray.init, which installs its own
    signals = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        from codedsmooth.service.http.server import startup_warnings

        for warning in startup_warnings(settings):
            log.warning("%s", warning)
        if settings.api_keys_file:
            from codedsmooth.service.access.shared_limits import start_limits_actor

            limits_actor = start_limits_actor(
                settings.quota_state, settings.api_keys_file, settings.quota_flush_ms / 1000.0
            )  # before the replicas, which charge it; the handle keeps it alive (a non-detached actor ends with its last handle)
        handle = start_serve(settings)
        # A first call through the handle makes its router learn the replicas, so that the
        # broadcast on shutdown reaches every replica at once.
        first = handle.info.remote().result(timeout_s=60)
        log.info("replica %s answered: %s", first["replica"], first)
        replicas = (
            f"{settings.min_replicas}..{settings.max_replicas} (autoscaling, {settings.replicas} initially)"
            if settings.autoscaling
            else str(settings.replicas)
        )
        log.info(
            "Ray Serve ready: %s replicas at http://%s:%d (ray %s in %.1fs, ready after %.1fs); replica metrics from port %d + rank",
            replicas,
            settings.host,
            settings.port,
            "started" if started_ray else "joined",
            t_ray,
            time.monotonic() - t0,
            settings.metrics_port,
        )
        while not stop.wait(0.5):
            pass
        for sig, old in signals.items():
            signal.signal(sig, old)  # a second signal stops at once
        log.info(
            "draining: replicas refuse new requests and finish accepted ones (at most %gs)", settings.drain_timeout_s
        )
        results = drain_replicas(handle, settings.drain_timeout_s + 5.0)
        log.info(
            "drained %d replicas: %s",
            len(results),
            json.dumps([r if isinstance(r, dict) else repr(r) for r in results]),
        )
        if limits_actor is not None:
            ray.get(limits_actor.close.remote(), timeout=30)  # the quota windows not yet written
        del limits_actor  # its last handle: the shared counters end with the application
    finally:
        if started_ray:
            serve.shutdown()
            ray.shutdown()
        else:
            try:
                serve.delete(APP_NAME)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not delete the application: %s", exc)
    return 0
