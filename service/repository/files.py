"""The model repository's files: its layout, repository.json and each model's serving.json, read and checked.

Nothing here loads a model into a server (that is ``.registry``); start-up and the CLI check with the same code.

Layout of ``--model-repository DIR``::

    DIR/
      repository.json     optional: {"required": [names], "aliases": {"default": {"pgd-at": 0.9, "coded-at": 0.1}}}
      pgd-at/             a checkpoint directory (model.safetensors, config.json), served as "pgd-at"
        serving.json      optional: this model's serving settings (``MODEL_SETTINGS``), over the server's flags
      coded-at/ ...

Directories whose names start with "." are skipped (``save_checkpoint`` writes into such temporary
directories); every other directory is a model, named by its directory. One ``--checkpoint`` is a
repository of one model, named by its checkpoint's config, with the server's settings only.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from codedsmooth.models import Checkpoint, load_checkpoint
from codedsmooth.models.regular_files import NotRegularFile, file_kind, read_regular
from codedsmooth.service.access.overrides import INHERIT, NO_OVERRIDE, LimitOverride
from codedsmooth.service.settings import ServeSettings

REPOSITORY_FILE = "repository.json"
MODEL_SETTINGS_FILE = "serving.json"
# What a model's serving.json may set; the server's flags are the defaults. rate_limit and quota
# there are per API key on this model, on top of the key's own limits (see access.Access.queue).
MODEL_SETTINGS = (
    "max_batch_size",
    "max_delay_ms",
    "max_queue_size",
    "max_items_per_request",
    "rci",
    "rci_scope",
    "rci_group_size",
    "coded_points",
    "rci_decode_tolerance",
    "input_noise_sigma",
    "rate_limit",
    "quota",
    "output",
)
MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class RepositoryError(ValueError):
    """A repository, its repository.json or a model's serving.json that cannot be used; names the file."""


@dataclass(frozen=True)
class RepositoryConfig:
    required: tuple[str, ...] = ()
    aliases: dict[str, dict[str, float]] = field(default_factory=dict)


def _hidden(name: str) -> bool:
    """A name starting with "." is no model ("." and ".." are no directories of the repository; save_checkpoint's temporary ones)."""
    return name.startswith(".")


def is_model_dir(root: Path, name: str) -> bool:
    """Whether ``name`` (e.g. from a URL) names a model directory of ``root``: a valid name, not hidden, a directory."""
    return MODEL_NAME.fullmatch(name) is not None and not _hidden(name) and (root / name).is_dir()


def model_names(root: Path) -> list[str]:
    """The models of a repository: its directories not starting with "."; ``RepositoryError`` for a bad root or name."""
    if not root.is_dir():
        raise RepositoryError(f"{root}: model repository not found (a directory of checkpoint directories)")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not _hidden(p.name))
    for name in names:
        if not MODEL_NAME.fullmatch(name):
            raise RepositoryError(
                f"{root / name}: a model's directory name must be 1-64 characters of A-Z a-z 0-9 _ . - (it is the model's name in URLs)"
            )
    if not names:
        raise RepositoryError(f"{root}: no checkpoint directories in the model repository")
    return names


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(read_regular(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RepositoryError(f"{path}: not valid JSON ({exc})") from None
    except NotRegularFile as exc:
        raise RepositoryError(str(exc)) from None
    except OSError as exc:
        raise RepositoryError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise RepositoryError(f"{path}: must hold a JSON object")
    return data


def read_repository_config(root: Path, names: list[str]) -> RepositoryConfig:
    """``root/repository.json`` (absent: no aliases, nothing required), checked against the repository's ``names``."""
    path = root / REPOSITORY_FILE
    if not path.exists():
        return RepositoryConfig()
    data = _read_json(path)
    unknown = sorted(set(data) - {"required", "aliases"})
    if unknown:
        raise RepositoryError(f'{path}: unknown key(s) {unknown}; it may hold "required" and "aliases"')
    aliases = data.get("aliases", {})
    if not isinstance(aliases, dict):
        raise RepositoryError(f'{path}: "aliases" must map alias names to {{model: weight}} objects')
    checked: dict[str, dict[str, float]] = {}
    for alias, weights in aliases.items():
        where = f"{path}: alias {alias!r}"
        if not MODEL_NAME.fullmatch(alias):
            raise RepositoryError(f"{where}: a name must be 1-64 characters of A-Z a-z 0-9 _ . -")
        if alias in names:
            raise named_as_alias(path, alias)
        if not isinstance(weights, dict) or not weights:
            raise RepositoryError(f'{where}: must map model names to weights, e.g. {{"pgd-at": 0.9, "coded-at": 0.1}}')
        for model, weight in weights.items():
            if model not in names:
                raise RepositoryError(f"{where}: {model!r} is no model of the repository ({', '.join(names)})")
            if type(weight) not in (int, float) or not math.isfinite(weight) or weight <= 0:
                raise RepositoryError(f"{where}: the weight of {model!r} must be a number > 0, got {weight!r}")
        checked[alias] = {m: float(w) for m, w in weights.items()}
    required = data.get("required", [])
    if not isinstance(required, list) or not all(isinstance(n, str) for n in required):
        raise RepositoryError(f'{path}: "required" must be a list of model names')
    missing = [n for n in required if n not in names]
    if missing:
        raise RepositoryError(f"{path}: required model(s) {missing} are not in the repository ({', '.join(names)})")
    return RepositoryConfig(tuple(required), checked)


def named_as_alias(path: Path, alias: str) -> RepositoryError:
    return RepositoryError(f"{path}: alias {alias!r}: a model of the repository has this name")


def model_settings(base: ServeSettings, model_dir: Path) -> tuple[ServeSettings, LimitOverride]:
    """The settings a model is served with: ``model_dir/serving.json`` over ``base``; and its per-key limits.

    Validated as the flags are (the same fields and bounds), each error naming the file. The file's
    ``rate_limit`` / ``quota`` are this model's limits per API key (``INHERIT`` where it sets none);
    the settings keep the server's, which stay the keys' overall limits.
    """
    path = model_dir / MODEL_SETTINGS_FILE
    if not path.exists():
        return base, NO_OVERRIDE
    given = _read_json(path)
    unknown = sorted(set(given) - set(MODEL_SETTINGS))
    if unknown:
        raise RepositoryError(f"{path}: unknown setting(s) {unknown}; a model may set {', '.join(MODEL_SETTINGS)}")
    values = base.model_dump()
    values.update(given)
    if "max_batch_size" in given and "max_items_per_request" not in given:
        assert base.max_items_per_request is not None  # validated settings have it (max_batch_size by default)
        values["max_items_per_request"] = (
            min(base.max_items_per_request, given["max_batch_size"])
            if isinstance(given["max_batch_size"], int)
            else None
        )
    try:
        checked = ServeSettings(**values)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()[:3]
        ]
        raise RepositoryError(f"{path}: {'; '.join(problems)}") from None
    limits = LimitOverride(
        rate=checked.rate_limit if "rate_limit" in given else INHERIT,
        quota=checked.quota if "quota" in given else INHERIT,
    )
    return checked.model_copy(update={"rate_limit": base.rate_limit, "quota": base.quota}), limits


def check_repository(settings: ServeSettings) -> list[str]:
    """Everything start-up would refuse, without building engines: names, files, every checkpoint. Returns the names.

    For the CLI, to fail before binding with the file and the problem (run it off the main thread:
    loading checkpoints runs torch).
    """
    if settings.model_repository is None:
        raise ValueError("no model repository to check")
    root = Path(settings.model_repository)
    names = model_names(root)
    config = read_repository_config(root, names)
    checkpoints = {}
    for name in names:
        check_model_files(root, name, settings.allow_external_symlinks)
        model_settings(settings, root / name)
        checkpoints[name] = load_checkpoint(root / name)
    check_aliases(config, checkpoints, root)
    check_default(settings.default_model, names, config)
    return names


def mismatched_alias(
    aliases: dict[str, dict[str, float]], checkpoints: dict[str, Checkpoint], naming: str | None = None
) -> str | None:
    """The first alias whose models among ``checkpoints`` differ in input shape or classes (a client cannot tell
    which it gets, so they must not); ``naming``: only the aliases that name that model. None when all agree."""
    for alias, weights in aliases.items():
        if naming is not None and naming not in weights:
            continue
        loaded = [checkpoints[m] for m in weights if m in checkpoints]
        if any(c.input_shape != loaded[0].input_shape or c.classes != loaded[0].classes for c in loaded[1:]):
            return alias
    return None


def check_aliases(config: RepositoryConfig, checkpoints: dict[str, Checkpoint], root: Path) -> None:
    """Start-up's check of every alias (see :func:`mismatched_alias`)."""
    alias = mismatched_alias(config.aliases, checkpoints)
    if alias is not None:
        raise RepositoryError(f"{root / REPOSITORY_FILE}: alias {alias!r}: its models differ in input shape or classes")


def check_default(default: str | None, names: list[str], config: RepositoryConfig) -> None:
    if default is not None and default not in names and default not in config.aliases:
        raise RepositoryError(
            f"--default-model {default!r} is neither a model nor an alias of the repository ({', '.join(names + sorted(config.aliases))})"
        )


# ---- what a load may open --------------------------------------------------------


def _inside(path: Path, root: Path, allow_external: bool) -> None:
    """Refuse a symlink (``path`` or a directory above it, below ``root``) that leads outside the repository."""
    if allow_external or not path.is_symlink():
        return
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(Path(os.path.realpath(root))):
        raise RepositoryError(
            f"{path}: a symlink that leads outside the model repository; refused (--allow-external-symlinks allows it)"
        )


def check_model_files(root: Path, name: str, allow_external: bool = False) -> None:
    """Before a model's files are opened: each entry of its directory is a regular file or a directory, and none is a
    symlink out of the repository; ``RepositoryError`` names the file.

    Why: opening a FIFO (or a device) blocks, and the load with it; a symlink out of the repository would let whoever
    writes the repository make the server read any file it can. ``stat`` never blocks on a FIFO. A file swapped for a
    FIFO after this check is caught where it is read: the load opens every file it reads without blocking and reads
    it only when ``fstat`` of that descriptor finds a regular file (``codedsmooth.models.regular_files``).
    """
    model_dir = root / name
    _inside(model_dir, root, allow_external)
    for entry in sorted(model_dir.iterdir()):
        _inside(entry, root, allow_external)
        try:
            mode = entry.stat().st_mode
        except OSError as exc:
            raise RepositoryError(f"{entry}: cannot read it ({exc.strerror or exc})") from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise RepositoryError(f"{entry}: {file_kind(mode)}; only regular files are loaded")


_ABSOLUTE = re.compile(r"(?<![\w.~-])/(?:[^\s:'\",;()/]+/)*([^\s:'\",;()/]+)")


def public_reason(reason: str, root: Path | None) -> str:
    """``reason`` as a client may see it: paths under the repository relative to it, any other absolute path its file
    name only (the server's layout is the operator's; the log and management clients see the full reason)."""
    if root is not None:
        for base in {str(Path(os.path.realpath(root))), str(root.absolute()), str(root)}:
            reason = reason.replace(base.rstrip("/") + "/", "")
    return _ABSOLUTE.sub(r"\1", reason)
