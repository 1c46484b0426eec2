"""The API keys file: its format, new keys, and the table a running server reloads when the file changes.

One client a line::

    # comments and blank lines are ignored
    <client-name> <sha256 hex of the key> [rate=R] [quota=Q] [rate@MODEL=R] [quota@MODEL=Q] [manage=yes]

- ``client-name``: 1-64 characters of ``A-Z a-z 0-9 _ . -``, unique in the file; ``unknown`` is
  reserved (the metrics' label for requests without a known key). Names appear in logs and metric
  labels; keys never do.
- the SHA-256 digest of the key, 64 hex digits, unique in the file. Keys are never stored in clear.
- ``rate=R`` (items per second, > 0) and ``quota=Q`` (items per quota window, an integer >= 0)
  override ``--rate-limit`` and ``--quota`` for this client; ``rate=none`` / ``quota=none`` lift
  the limit for it.
- ``rate@MODEL=R`` and ``quota@MODEL=Q`` override, for this client, the per-key limits that model
  ``MODEL`` of a repository sets in its ``serving.json`` (``none`` lifts them; a model that sets
  none gets them for this client only). ``MODEL`` is a model's name, never an alias (an alias's
  requests are charged to the model they are routed to); it need not be loaded: the limit applies
  when it is. A server warns of names that are no model of it (``Access.check_overrides``).
- ``manage=yes`` lets this client load and unload models (``POST /v2/repository/models/NAME/load``
  and ``…/unload`` with ``--model-control explicit``); other clients get 403 there. ``manage=no``,
  the default, says so explicitly.

:func:`add_key` makes a key with ``secrets`` (256 bits, URL-safe text), appends its line (creating
the file with mode 0600) and returns the key, which is shown once and kept nowhere.
:class:`KeysFile` holds the table a server uses and reloads it when the file's size, modification
time or inode changes; a file that no longer parses (or is gone) leaves the last good table in
force (never an open server) and is reported by :meth:`KeysFile.poll`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from codedsmooth.service.access.overrides import INHERIT, NO_OVERRIDE, Inherit, LimitOverride

NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
DIGEST = re.compile(r"[0-9a-fA-F]{64}")
UNKNOWN = "unknown"  # the client name of a request with no key or an unknown one (a metric label, never a file's name)
UNLIMITED = "none"
MANAGE_VALUES = {"yes": True, "no": False}  # manage=... in the keys file
KEY_BYTES = 32  # 256 bits of the OS CSPRNG per key


class KeysFileError(ValueError):
    """A keys file that cannot be used: names the file and, for a bad line, its number."""


@dataclass(frozen=True)
class Client:
    """One line of the keys file. ``limits``: its ``rate=`` / ``quota=`` (``INHERIT``: the server's flags);
    ``manage``: may load and unload models; ``per_model``: its ``rate@MODEL=`` / ``quota@MODEL=`` by model,
    in the order the line names the models (``INHERIT``: the model's own per-key limit)."""

    name: str
    digest: bytes  # sha256 of the key
    limits: LimitOverride = NO_OVERRIDE
    manage: bool = False
    per_model: tuple[tuple[str, LimitOverride], ...] = ()

    def on_model(self, model: str) -> LimitOverride:
        """This client's own limits on ``model`` (``NO_OVERRIDE`` when its line names none)."""
        return next((limits for m, limits in self.per_model if m == model), NO_OVERRIDE)


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


@dataclass
class KeyTable:
    """The clients of one version of the keys file, looked up by the digest of the key a request presents."""

    clients: dict[bytes, Client] = field(default_factory=dict)

    def find(self, key: str) -> Client | None:
        """The client whose key is ``key``, or None.

        The key is hashed first and the table is keyed by digest, so what the lookup's timing could
        depend on is the digest of what the client sent, which tells nothing about any stored key;
        the found entry is confirmed with ``hmac.compare_digest``.
        """
        digest = digest_of(key)
        client = self.clients.get(digest)
        if client is not None and hmac.compare_digest(client.digest, digest):
            return client
        return None

    @property
    def names(self) -> list[str]:
        return sorted(c.name for c in self.clients.values())

    def model_overrides(self) -> list[tuple[str, str, str]]:
        """(client name, kind, model) of every per-model limit in the table, sorted."""
        return sorted(
            (c.name, kind, model)
            for c in self.clients.values()
            for model, limits in c.per_model
            for kind in _given(limits)
        )


def _limit(value: str, kind: type, where: str, what: str):
    if value == UNLIMITED:
        return None
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or not math.isfinite(number) or (number <= 0 if kind is float else number < 0):
        need = "a number > 0" if kind is float else "an integer >= 0"
        raise KeysFileError(f"{where}: {what} must be {need} or {UNLIMITED!r}, got {value[:40]!r}")
    return number


def _given(limits: LimitOverride) -> dict[str, float | int | None]:
    """The limits a line sets, by option name ("rate", "quota")."""
    return {kind: value for kind, value in (("rate", limits.rate), ("quota", limits.quota)) if value is not INHERIT}


def _manage(value: str, where: str) -> bool:
    if value not in MANAGE_VALUES:
        raise KeysFileError(f"{where}: manage must be 'yes' or 'no', got {value[:40]!r}")
    return MANAGE_VALUES[value]


def check_name(name: str, where: str) -> None:
    if not NAME.fullmatch(name):
        raise KeysFileError(f"{where}: client name {name[:70]!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
    if name == UNKNOWN:
        raise KeysFileError(
            f"{where}: the client name {UNKNOWN!r} is reserved (it labels requests without a known key)"
        )


def parse_line(line: str, where: str) -> Client | None:
    """One line of a keys file (None for a comment or a blank line); ``where`` names it in errors."""
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    parts = text.split()
    if len(parts) < 2:
        raise KeysFileError(
            f"{where}: expected '<client-name> <sha256 hex of the key> [rate=R] [quota=Q] [rate@MODEL=R] [quota@MODEL=Q] [manage=yes]'"
        )
    name, digest, options = parts[0], parts[1], parts[2:]
    check_name(name, where)
    if not DIGEST.fullmatch(digest):
        raise KeysFileError(
            f"{where}: expected the SHA-256 of the key as 64 hex digits after the name (keys are never stored in clear)"
        )
    given: dict[tuple[str, str], object] = {}  # (kind, model: "" for the client-wide limit) -> value
    for option in options:
        key, sep, value = option.partition("=")
        kind, at, model = key.partition("@")
        if not sep or kind not in ("rate", "quota", "manage") or (at and kind == "manage"):
            raise KeysFileError(
                f"{where}: unknown option {option[:40]!r}; a line may end with rate=R, quota=Q, rate@MODEL=R, quota@MODEL=Q and manage=yes"
            )
        if at and not NAME.fullmatch(model):
            raise KeysFileError(
                f"{where}: {option[:40]!r}: MODEL in {kind}@MODEL must be a model's name, 1-64 characters of A-Z a-z 0-9 _ . -"
            )
        if (kind, model) in given:
            raise KeysFileError(f"{where}: {key} given twice")
        given[kind, model] = (
            _manage(value, where) if kind == "manage" else _limit(value, float if kind == "rate" else int, where, key)
        )

    def override(model: str) -> LimitOverride:  # the kind decides the type: rate is _limit(float), quota _limit(int)
        return LimitOverride(
            cast("float | None | Inherit", given.get(("rate", model), INHERIT)),
            cast("int | None | Inherit", given.get(("quota", model), INHERIT)),
        )

    models = dict.fromkeys(model for _, model in given if model)  # in the order the line names them
    return Client(
        name,
        bytes.fromhex(digest),
        override(""),
        bool(given.get(("manage", ""), False)),
        tuple((m, override(m)) for m in models),
    )


def parse_keys(text: str, path: str) -> KeyTable:
    table = KeyTable()
    names: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{path}, line {number}"
        client = parse_line(line, where)
        if client is None:
            continue
        if client.name in names:
            raise KeysFileError(f"{where}: client {client.name!r} is already on line {names[client.name]}")
        if client.digest in table.clients:
            raise KeysFileError(
                f"{where}: the same key as client {table.clients[client.digest].name!r} (each client needs its own key)"
            )
        names[client.name] = number
        table.clients[client.digest] = client
    return table


def read_keys(path: str | os.PathLike) -> KeyTable:
    """The table of a keys file; ``KeysFileError`` naming the file (and line) when it cannot be used."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeysFileError(
            f"keys file {path} does not exist (make one with: codedsmooth keys add NAME --file {path})"
        ) from None
    except UnicodeDecodeError:
        raise KeysFileError(f"keys file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise KeysFileError(f"cannot read keys file {path}: {exc.strerror or exc}") from None
    return parse_keys(text, str(path))


def format_line(client: Client) -> str:
    parts = [client.name, client.digest.hex()]
    parts += [f"{kind}={_written(value)}" for kind, value in _given(client.limits).items()]
    for model, limits in client.per_model:
        parts += [f"{kind}@{model}={_written(value)}" for kind, value in _given(limits).items()]
    if client.manage:
        parts.append("manage=yes")
    return " ".join(parts)


def _written(value: float | int | None) -> str:
    """A limit as the file writes it, read back to the same value: ``none``, a whole number, or the float's repr."""
    if value is None:
        return UNLIMITED
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def add_key(
    path: str | os.PathLike, name: str, rate: str | None = None, quota: str | None = None, manage: bool = False
) -> str:
    """Make a key for a new client ``name``, append its line to the file (mode 0600 when created) and return the key.

    ``rate``/``quota``: the client's own limits as the file writes them (a number or ``none``;
    None: the server's flags); ``manage``: the client may load and unload models. Refuses a bad name or limit, a name already in the file, and a file
    that does not parse; nothing is written then.
    """
    path = Path(path)
    check_name(name, "the new client")
    limits = LimitOverride(
        INHERIT if rate is None else _limit(rate, float, "the new client", "rate"),
        INHERIT if quota is None else _limit(quota, int, "the new client", "quota"),
    )
    existing = read_keys(path) if path.exists() else KeyTable()
    if name in existing.names:
        raise KeysFileError(f"{path}: client {name!r} already has a key (remove its line to replace it)")
    key = secrets.token_urlsafe(KEY_BYTES)
    ends_cleanly = not path.exists() or path.stat().st_size == 0 or path.read_bytes().endswith(b"\n")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(("" if ends_cleanly else "\n") + format_line(Client(name, digest_of(key), limits, manage)) + "\n")
    return key


@dataclass(frozen=True)
class Reload:
    """What one :meth:`KeysFile.poll` found: a new table (``error`` None) or a problem (the old table stays)."""

    error: str | None
    clients: int


class KeysFile:
    """The table of a keys file, reloaded when the file changes (checked at most every ``interval_s``)."""

    def __init__(self, path: str | os.PathLike, interval_s: float = 1.0):
        self.path = str(path)
        self.interval_s = interval_s
        self._stamp = self._stat()  # before reading: a change while reading is seen at the next poll
        self.table = read_keys(self.path)
        self._failed_stamp: tuple[int, int, int] | str | None = (
            None  # the version that failed last (reported once, not on every poll)
        )

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def poll(self) -> Reload | None:
        """Reload if the file changed since the last look; None when it did not (or its failure was reported already)."""
        stamp = self._stat()
        if stamp == self._stamp:
            self._failed_stamp = None  # back to the version in force (e.g. a file restored after a bad edit)
            return None
        if stamp is not None and stamp == self._failed_stamp:
            return None
        if stamp is None:
            if self._failed_stamp == "missing":
                return None
            self._failed_stamp = "missing"
            return Reload(
                f"keys file {self.path} is gone; keeping the last table ({len(self.table.clients)} clients)",
                len(self.table.clients),
            )
        try:
            table = read_keys(self.path)
        except KeysFileError as exc:
            self._failed_stamp = stamp
            return Reload(
                f"{exc}; keeping the last good table ({len(self.table.clients)} clients)", len(self.table.clients)
            )
        self.table, self._stamp, self._failed_stamp = table, stamp, None
        return Reload(None, len(table.clients))
