"""Results of the report's stages kept on disk, so a long run can be run in parts and resumed.

A stage's result is stored under ``<runs>/stages/<name>-<key>.pt`` where the key is a hash of
everything the result depends on (its budgets, the checkpoints' SHA-256, the sample's indices,
the results of earlier stages it builds on). A stage whose inputs are unchanged is read back
instead of run again; any change in its inputs gives a new key and a fresh run. Results are
plain data (tensors, numbers, strings, lists, dicts), saved with ``torch.save`` and read with
``weights_only=True`` (no pickled code).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import time
from pathlib import Path
from typing import Any, Protocol

import torch

log = logging.getLogger("codedsmooth.report")
# Part of every key: raise it when a stage's code changes what it computes, so no older result is read back.
STAGE_VERSION = 1


def digest(material: Any) -> str:
    """A short stable hash of JSON-able ``material`` (tensors are hashed by their bytes)."""

    def default(o):
        if isinstance(o, torch.Tensor):
            return (
                hashlib.sha256(o.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
                + str(tuple(o.shape))
                + str(o.dtype)
            )
        return str(o)

    text = json.dumps({"version": STAGE_VERSION, "material": material}, sort_keys=True, default=default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Stage(Protocol):
    """A stage's work, called with no arguments (a lambda that binds its loop variables as defaults is one)."""

    def __call__(self) -> Any: ...


class StageCache:
    """``run(name, key, fn)``: ``fn()``'s result for these inputs, computed once and kept under ``root``.

    ``seconds`` holds, per stage name, the compute time of each result (read back from the file
    when it is reused), and ``reused`` the names read back.
    """

    def __init__(self, root: str | Path | None):
        self.root = Path(root) / "stages" if root is not None else None
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []

    def path(self, name: str, key: Any) -> Path | None:
        if self.root is None:
            return None
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        return self.root / f"{safe}-{digest(key)}.pt"

    def run(self, name: str, key: Any, fn: Stage) -> Any:
        path = self.path(name, key)
        if path is not None and path.exists():
            try:
                stored = torch.load(path, weights_only=True)
                self.seconds[name] = float(stored["seconds"])
                self.reused.append(name)
                log.info("stage %s: reused %s", name, path.name)
                return stored["result"]
            except (
                OSError,
                RuntimeError,
                KeyError,
                EOFError,
                ValueError,
                pickle.UnpicklingError,
            ) as exc:  # a damaged file: run the stage again
                log.warning("stage %s: cannot read %s (%s); running it again", name, path, exc)
        started = time.monotonic()
        result = fn()
        seconds = time.monotonic() - started
        self.seconds[name] = seconds
        log.info("stage %s: %.0f s", name, seconds)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"seconds": seconds, "result": result}, tmp)
            tmp.replace(path)  # atomic: an interrupted run leaves no half-written result
        return result
