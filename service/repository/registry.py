"""The registry of the models one server holds: each with its own settings, engine and micro-batcher;
routing by name and alias; explicit load and unload. The files it loads from are read by ``.files``.

Sharing the device and the model thread: by default (``--model-threads shared``) every model's
micro-batcher hands its device batches to the server's one model thread (a single-worker executor,
first come first served). A batcher has at most one batch there at a time, so while several models
have work the thread runs one batch of each in turn: a flooded model gets one device batch per
round, never the thread, and only its own queue (``max_queue_size`` of its own) fills up and
answers 503. With ``--model-threads per-model`` each model runs its batches on a thread of its own
(started with the model, ended when it is unloaded): a batch of one model never waits for
another's, and they compete only for the cores (on CPU with ``--threads 1`` each model's torch work
stays on its own thread). Loading at start-up runs on the shared thread (nothing is served yet); an
explicit load or reload runs on a loader thread of its own, never on the event loop or a model
thread, so every loaded model, health and metrics answer as usual however slow or stuck the load
is; past ``--load-timeout-s`` it is reported failed (504) and its thread abandoned (a daemon, its
result dropped). Before any file of a model is opened, ``files.check_model_files`` refuses FIFOs,
devices, sockets and symlinks out of the repository (400 naming the file).

A failed load's reason names its file: in full in the log and, for management clients, on the
index; every other client sees it without server paths (``files.public_reason``).

Aliases route a request to one of several models with the weights given; the draw is Python's
``random`` seeded from the OS at start (an A/B split, not a defence), among the alias's models that
are loaded. Each answer names the model that produced it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from codedsmooth.models import Checkpoint, default_checkpoint_path, load_checkpoint, resolve_device
from codedsmooth.service.access.overrides import NO_OVERRIDE, LimitOverride
from codedsmooth.service.batcher import MicroBatcher
from codedsmooth.service.engine import InferenceEngine
from codedsmooth.service.errors import BadRequest, DeadlineExceeded, NotFound, Unavailable, quoted
from codedsmooth.service.metrics import BatchObserver, Metrics, ModelMetrics
from codedsmooth.service.repository.files import (
    REPOSITORY_FILE,
    RepositoryConfig,
    RepositoryError,
    check_aliases,
    check_default,
    check_model_files,
    is_model_dir,
    mismatched_alias,
    model_names,
    model_settings,
    named_as_alias,
    public_reason,
    read_repository_config,
)
from codedsmooth.service.settings import ServeSettings

log = logging.getLogger("codedsmooth.repository")

UNLOADED = "unloaded"  # the reason of an UNAVAILABLE model never loaded or unloaded


class LoadFailed(BadRequest):
    """An explicit load refused: the checkpoint or its settings are broken (the message names the file)."""


class LoadTimedOut(DeadlineExceeded):
    """An explicit load not done within ``--load-timeout-s`` (its thread is abandoned; the model stays as it was)."""


def _on_loader_thread(fn, *args) -> Future:
    """Run ``fn(*args)`` on a new daemon thread (a stuck load never holds a pool's worker, nor the exit)."""
    future: Future = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting load as it is
            future.set_exception(exc)

    threading.Thread(target=run, name=f"codedsmooth-load-{args[0] if args else ''}", daemon=True).start()
    return future


@dataclass(eq=False)
class ServedModel:
    """One loaded model: its checkpoint, effective settings, engine and (once started) micro-batcher."""

    name: str
    version: int
    path: Path
    settings: ServeSettings
    key_limits: LimitOverride  # rate_limit / quota per API key on this model, from its serving.json
    checkpoint: Checkpoint
    engine: InferenceEngine
    metrics: ModelMetrics
    batcher: MicroBatcher | None = None
    own_thread: ThreadPoolExecutor | None = None  # --model-threads per-model: the thread its batches run on
    unloading: bool = False
    holders: int = 0  # requests that were routed to it and are not answered yet

    @property
    def idle(self) -> bool:
        return self.holders == 0 and (self.batcher is None or self.batcher.idle)

    def end_thread(self) -> None:
        """End its own thread (``--model-threads per-model``) once any call still running on it returns; nothing more is sent to it."""
        if self.own_thread is not None:
            self.own_thread.shutdown(wait=False, cancel_futures=True)

    def start(self, shared_thread, own_thread: bool = False) -> None:
        """Start its micro-batcher, on the server's model thread or (``own_thread``) on a thread of its own."""
        s = self.settings
        if own_thread:
            self.own_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"codedsmooth-model-{self.name}")
        executor = self.own_thread or shared_thread
        observer = BatchObserver(self.metrics, self.engine.scope)
        self.batcher = MicroBatcher(
            self.engine,
            self.metrics,
            executor,
            s.max_batch_size,
            s.max_delay_ms / 1000.0,
            s.max_queue_size,
            on_batch=observer,
        )
        self.batcher.start()


# ---- the registry -----------------------------------------------------------------


class Repository:
    """The models a server holds, by name; aliases; explicit load and unload. Used on the event loop only,
    except ``load_all`` and ``_load`` (the model thread)."""

    def __init__(self, settings: ServeSettings, metrics: Metrics, engine_factory, executor):
        self.settings = settings
        self.metrics = metrics
        self.engine_factory = engine_factory
        self.executor = executor  # the model thread
        self.own_threads = settings.model_threads == "per-model"
        self.root = Path(settings.model_repository) if settings.model_repository else None
        self.explicit = settings.model_control == "explicit"
        self.config = RepositoryConfig()
        self.models: dict[str, ServedModel] = {}
        self.loading: set[str] = set()
        self.failed: dict[str, str] = {}  # name -> why its last load failed
        self.loads: dict[str, int] = {}  # name -> versions loaded so far (a load's version is the next one)
        self.default: str | None = settings.default_model
        self.device: torch.device | None = None
        self._draw = random.Random()  # seeded from the OS
        self._lock: asyncio.Lock | None = None  # loads and unloads one at a time (made on the loop)

    # ---- loading (model thread) -------------------------------------------------

    def load_all(self) -> None:
        """Load every model (on the model thread); raises with the file and the problem."""
        self.device = resolve_device(self.settings.device)
        if self.root is None:
            path = self.settings.checkpoint or default_checkpoint_path()
            checkpoint = load_checkpoint(path, device=self.device)
            model = self._build(checkpoint.name, Path(path), checkpoint, self.settings, NO_OVERRIDE, 1)
            self.models[model.name] = model
            self.default = model.name
            return
        names = model_names(self.root)
        self.config = read_repository_config(self.root, names)
        for name in names:
            self.models[name] = self._load(name, 1)
        check_aliases(self.config, {n: m.checkpoint for n, m in self.models.items()}, self.root)
        check_default(self.default, names, self.config)
        if self.default is None and len(names) == 1:
            self.default = names[0]

    def _load(self, name: str, version: int) -> ServedModel:
        assert self.root is not None and self.device is not None  # loading by name: a started repository server only
        path = self.root / name
        if name in self.config.aliases:  # a directory added after start with an alias's name: refused, as at start-up
            raise named_as_alias(self.root / REPOSITORY_FILE, name)
        check_model_files(self.root, name, self.settings.allow_external_symlinks)
        settings, limits = model_settings(self.settings, path)
        checkpoint = load_checkpoint(path, device=self.device)
        return self._build(name, path, checkpoint, settings, limits, version)

    def _build(self, name, path, checkpoint, settings, limits, version) -> ServedModel:
        engine = self.engine_factory(checkpoint, settings, self.device)
        engine.warm_up(settings.max_batch_size)
        log.info("loaded %s (version %d) from %s on %s (%s)", name, version, path, self.device, engine.spec.label())
        return ServedModel(name, version, path, settings, limits, checkpoint, engine, self.metrics.for_model(name))

    def start(self) -> None:
        """Start every loaded model's batcher (on the loop)."""
        self._lock = asyncio.Lock()
        for model in self.models.values():
            self.loads[model.name] = model.version
            model.start(self.executor, own_thread=self.own_threads)
            self.metrics.model_loaded.labels(model.name).set(1)

    def known_names(self) -> tuple[set[str], set[str]]:
        """The models this server holds or could load (its repository's directories now), and its aliases."""
        names = set(self.models)
        if self.root is not None:
            try:
                names |= set(model_names(self.root))
            except RepositoryError:  # the directory changed under the server: what is loaded still counts
                pass
        return names, set(self.config.aliases)

    # ---- routing ----------------------------------------------------------------

    def _serving(self, name: str) -> ServedModel | None:
        model = self.models.get(name)
        return model if model is not None and not model.unloading else None

    def resolve(self, name: str) -> ServedModel:
        """The model a request for ``name`` goes to (an alias: a weighted draw among its loaded models); 404 otherwise."""
        model = self._serving(name)
        if model is not None:
            return model
        weights = self.config.aliases.get(name)
        if weights is None:
            raise self._not_found(name)
        live = [(m, w) for t, w in weights.items() if (m := self._serving(t)) is not None]
        if not live:
            raise NotFound(f"alias {name!r}: none of its models ({', '.join(weights)}) is loaded")
        return self._draw.choices([m for m, _ in live], [w for _, w in live])[0]

    def describe(self, name: str) -> ServedModel:
        """The model whose metadata ``name`` shows, without a draw (an alias: its first loaded model)."""
        model = self._serving(name)
        if model is not None or name not in self.config.aliases:
            return model or self.resolve(name)
        return next(
            (m for t in self.config.aliases[name] if (m := self._serving(t)) is not None), None
        ) or self.resolve(name)

    def default_model(self) -> ServedModel:
        if self.default is None:
            raise NotFound(
                f"no default model; use POST /v1/models/{{name}}/predict with one of {', '.join(self.names())}, or start the server with --default-model"
            )
        return self.resolve(self.default)

    def _not_found(self, name: str) -> NotFound | Unavailable:
        if name in self.loading:
            return Unavailable(f"model {name!r} is loading", retry_after_s=2)
        if self.root is not None and is_model_dir(self.root, name):
            why = (
                f" (its last load failed: {public_reason(self.failed[name], self.root)})" if name in self.failed else ""
            )
            return NotFound(f"model {name!r} is not loaded{why}")
        return NotFound(f"unknown model {quoted(name)}; this server serves {', '.join(repr(n) for n in self.names())}")

    def names(self) -> list[str]:
        return sorted(n for n, m in self.models.items() if not m.unloading)

    def serving(self) -> list[ServedModel]:
        return [self.models[n] for n in self.names()]

    @property
    def required_loaded(self) -> bool:
        return bool(self.names()) and all(self._serving(n) is not None for n in self.config.required)

    def batchers(self) -> list[MicroBatcher]:
        return [m.batcher for m in self.models.values() if m.batcher is not None]

    # ---- index, load, unload ----------------------------------------------------

    def index(self, paths: bool = False) -> list[dict]:
        """Every model of the repository with its state (Triton's repository index); ``paths``: failed loads' reasons with
        the server's paths (for management clients), else without."""
        names = set(self.models) | self.loading | set(self.failed)
        if self.root is not None and self.root.is_dir():
            names |= {p.name for p in self.root.iterdir() if is_model_dir(self.root, p.name)}
        out = []
        for name in sorted(names):
            model = self.models.get(name)
            entry: dict = {"name": name}
            if model is not None:
                entry.update(version=str(model.version), state="UNLOADING" if model.unloading else "READY")
            elif name in self.loading:
                entry["state"] = "LOADING"
            else:
                reason = self.failed.get(name, UNLOADED)
                entry.update(state="UNAVAILABLE", reason=reason if paths else public_reason(reason, self.root))
            out.append(entry)
        return out

    def _model_dir(self, name: str) -> Path:
        if self.root is None or not is_model_dir(self.root, name):
            where = "" if self.root is None else f"; no directory {quoted(name)} in the model repository"
            raise NotFound(f"unknown model {quoted(name)}{where}")
        return self.root

    async def load(self, name: str) -> ServedModel:
        """Load (or reload: a new version swapped in, the old one drained) ``name`` from the repository."""
        root = self._model_dir(name)
        assert self._lock is not None  # made by start()
        async with self._lock:
            old = self.models.get(name)
            version = self.loads.get(name, 0) + 1
            assert self.root is not None  # loading by name: a repository server only
            self.loading.add(name)
            try:
                loading = asyncio.wrap_future(_on_loader_thread(self._load, name, version))
                model = await asyncio.wait_for(loading, self.settings.load_timeout_s)
            except asyncio.TimeoutError:
                reason = f"{self.root / name}: the load did not finish within {self.settings.load_timeout_s:g} s (--load-timeout-s)"
                self.failed[name] = reason
                log.error("load of %s failed: %s; its thread is abandoned", name, reason)
                raise LoadTimedOut(f"model {name!r} not loaded: {public_reason(reason, self.root)}") from None
            except Exception as exc:  # noqa: BLE001 - any failure to load is the checkpoint's; the others keep serving
                reason = str(exc) if isinstance(exc, ValueError) else f"{root / name}: {type(exc).__name__}: {exc}"
                self.failed[name] = reason
                log.error("load of %s refused: %s", name, reason)
                raise LoadFailed(f"model {name!r} not loaded: {public_reason(reason, self.root)}") from None
            finally:
                self.loading.discard(name)
            checkpoints = {**{t: m.checkpoint for t, m in self.models.items()}, name: model.checkpoint}
            if mismatched_alias(self.config.aliases, checkpoints, naming=name) is not None:
                raise LoadFailed(
                    f"model {name!r} not loaded: it differs in input shape or classes from the other models of its alias"
                )
            model.start(self.executor, own_thread=self.own_threads)
            self.loads[name] = version
            self.failed.pop(name, None)
            self.models[name] = model  # new requests go to the new version from here
            self.metrics.model_loaded.labels(name).set(1)
            if old is not None:
                old.unloading = True
                await self._retire(old)
            return model

    async def unload(self, name: str) -> ServedModel:
        """Stop routing to ``name``, let its accepted requests finish, then free it."""
        assert self._lock is not None  # made by start()
        async with self._lock:
            model = self._serving(name)
            if model is None:
                raise self._not_found(name)
            model.unloading = True
            self.metrics.model_loaded.labels(name).set(0)
            await self._retire(model)
            if self.models.get(name) is model:
                del self.models[name]
            return model

    async def _retire(self, model: ServedModel) -> None:
        """Drain one model (its requests routed before now finish, up to the drain timeout), then free it."""
        end = asyncio.get_running_loop().time() + self.settings.drain_timeout_s
        while not model.idle and asyncio.get_running_loop().time() < end:
            await asyncio.sleep(0.01)
        if model.batcher is not None:
            if not model.idle:
                log.warning(
                    "%s version %d: drain timeout passed; answering what is left 503", model.name, model.version
                )
            model.batcher.refusal = (
                f"model {model.name!r} was unloaded (version {model.version})"  # not the server stopping
            )
            model.batcher.draining = True
            model.batcher.fail_pending(model.batcher.refusal)
            await model.batcher.stop()
        model.end_thread()  # its batcher has stopped
        if model.holders == 0:  # drop the last references: the weights go with them
            # typed as always set: no request reaches a model once it is unloaded and unheld
            model.engine = model.checkpoint = model.batcher = None  # type: ignore[assignment]
        await asyncio.get_running_loop().run_in_executor(self.executor, _free_memory)
        log.info("unloaded %s version %d", model.name, model.version)


def end_model_threads(models) -> None:
    """At server stop: end the models' own threads (``--model-threads per-model``) after any call still running."""
    for model in models:
        model.end_thread()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
