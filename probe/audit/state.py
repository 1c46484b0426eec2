"""The audit's resumable state: per-image results cached in a JSON file keyed by the audit's settings.

An audit interrupted (Ctrl-C, a spent quota, ``--max-queries``) keeps every image it finished; ``--resume``
reads them back and queries only what is left. The key is a hash of every setting that changes an answer
(not the cap on queries, which a resumed audit may raise), so a state file is never applied to another audit.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass
class AuditState:
    key: str
    settings: dict[str, Any]
    clean: dict[str, Any] | None = None  # {"correct": [per image], "randomized": bool, "returns_scores": bool}
    attacks: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=dict
    )  # attack -> str(position) -> {"broken", "queries"}
    traffic: dict[str, Any] | None = None
    wall_s: float = 0.0

    @classmethod
    def open(cls, path: Path, settings: dict[str, Any], resume: bool) -> AuditState:
        key = settings_key(settings)
        if not path.exists():
            return cls(key, settings)
        if not resume:
            raise ValueError(
                f"{path} holds an earlier audit's results: pass --resume to continue it, or remove the file to start over"
            )
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not an audit state file ({exc})") from None
        if d.get("key") != key:
            old = d.get("settings", {})
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(
                f"{path} belongs to an audit with other settings ({', '.join(diff)} differ): resume with the same settings, or use another --state"
            )
        return cls(key, settings, d.get("clean"), d.get("attacks", {}), d.get("traffic"), float(d.get("wall_s", 0.0)))

    def save(self, path: Path) -> None:
        """Written to a temporary file and renamed: an interruption mid-write leaves the previous state whole."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        body = {
            "key": self.key,
            "settings": self.settings,
            "clean": self.clean,
            "attacks": self.attacks,
            "traffic": self.traffic,
            "wall_s": self.wall_s,
        }
        tmp.write_text(json.dumps(body) + "\n")
        os.replace(tmp, path)
