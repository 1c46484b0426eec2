"""The report's checkpoints as an auditor gets them: SHA-256 of each file, the environment, a published copy.

``codedsmooth report`` records, per checkpoint, the SHA-256 of ``model.safetensors`` and
``config.json`` and copies both into ``weights/<method>-seed<s>/`` beside the markdown, so the
exact weights the numbers describe can be checked out, verified and attacked. Retraining gives
the same weights only with the same torch build and thread count; the published files do not
depend on either.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

FILES = ("config.json", "model.safetensors")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_record(path: str | Path) -> dict:
    """{file: {"sha256", "bytes"}} of a checkpoint directory's files."""
    path = Path(path)
    return {name: {"sha256": sha256(path / name), "bytes": (path / name).stat().st_size} for name in FILES}


def publish(path: str | Path, dest: str | Path) -> Path:
    """Copy a checkpoint's files to ``dest`` (a directory), unless identical files are already there."""
    path, dest = Path(path), Path(dest)
    if path.resolve() == dest.resolve():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        target = dest / name
        if not target.exists() or sha256(target) != sha256(path / name):
            shutil.copyfile(path / name, target)
    return dest
