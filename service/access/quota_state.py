"""Quota counters kept across restarts: each client's quota window in an SQLite file (stdlib ``sqlite3``, WAL mode).

Why: quota counters in memory only give every key a fresh quota at each restart. What is kept,
per :class:`~codedsmooth.service.access.limits.CounterKey` (client, and model where a per-model
quota applies): the window's start (wall-clock epoch seconds), the items used in it, and its
length. A row is kept until its window has passed (dropped at the next start). Rate-limit buckets
are not kept: after a restart every bucket is full (at most one burst more).

The hot path never waits on the disk: a charge only notes the key's new window in a dict; a
writer thread writes every noted window in one transaction each ``flush_s`` (``--quota-flush-ms``)
and once more on a graceful stop. A crash (kill -9, power loss after the OS wrote the WAL) loses
at most the charges of the last ``flush_s`` seconds plus the one transaction being written.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

from codedsmooth.service.access.limits import CounterKey, Counters, Decision, Limits

log = logging.getLogger("codedsmooth.access")

NONE = "none"  # --quota-state none: counters in memory only
SUFFIX = ".quota.sqlite"  # the default file: beside the keys file, its name plus this
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS quota_windows ("
    " client TEXT NOT NULL, model TEXT NOT NULL, start_epoch REAL NOT NULL, used REAL NOT NULL, window_s REAL NOT NULL,"
    " PRIMARY KEY (client, model))"
)


def quota_state_path(quota_state: str | None, api_keys_file: str | None) -> Path | None:
    """Where the counters are kept: ``quota_state`` (``none``: nowhere), by default beside the keys file."""
    if api_keys_file is None or quota_state == NONE:
        return None
    return Path(quota_state) if quota_state else Path(api_keys_file + SUFFIX)


class QuotaStore:
    """One SQLite file of quota windows, written by a thread of its own (see the module's docstring)."""

    def __init__(self, path: Path, flush_s: float):
        self.path = path
        self.flush_s = flush_s
        self._pending: dict[CounterKey, tuple[float, float, float]] = {}  # key -> (start_epoch, used, window_s)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._thread = threading.Thread(target=self._run, name="codedsmooth-quota-writer", daemon=True)
        self._thread.start()

    def load(self) -> dict[CounterKey, tuple[float, float, float]]:
        """Every window not yet over: key -> (start_epoch, used, window_s); the ones over are deleted."""
        now = time.time()
        with self._lock:
            self._db.execute("DELETE FROM quota_windows WHERE start_epoch + window_s <= ?", (now,))
            rows = self._db.execute("SELECT client, model, start_epoch, used, window_s FROM quota_windows").fetchall()
        return {CounterKey(c, m or None): (s, u, w) for c, m, s, u, w in rows}

    def note(self, key: CounterKey, start_epoch: float, used: float, window_s: float) -> None:
        """Remember ``key``'s window for the next write (no disk on the caller's thread)."""
        with self._lock:
            self._pending[key] = (start_epoch, used, window_s)

    def flush(self) -> int:
        """Write every noted window now (one transaction); how many."""
        with self._lock:
            pending, self._pending = self._pending, {}
            if not pending:
                return 0
            rows = [(k.client, k.model or "", s, u, w) for k, (s, u, w) in pending.items()]
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO quota_windows VALUES (?, ?, ?, ?, ?)", rows)
            self._db.execute("COMMIT")
        return len(rows)

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self.flush_s)
            try:
                self.flush()
            except sqlite3.Error as exc:  # the disk is the operator's: say so, keep counting in memory
                log.error("%s: cannot write the quota counters (%s); retrying", self.path, exc)

    def close(self) -> None:
        """Write what is left and close the file (a graceful stop loses nothing)."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)
        try:
            self.flush()
        finally:
            self._db.close()


class PersistentCounters(Counters):
    """:class:`Counters` whose quota windows start from, and are noted to, a :class:`QuotaStore`.

    Windows are kept on the store in wall-clock seconds and here in ``time.monotonic`` seconds
    (the counters' clock); ``offset`` converts between them for this process.
    """

    def __init__(self, store: QuotaStore):
        super().__init__()
        self.store = store
        self.offset = time.time() - time.monotonic()
        for key, (start_epoch, used, _window_s) in store.load().items():
            self.windows[key] = [start_epoch - self.offset, used]

    def _note(self, key: CounterKey, limits: Limits) -> None:
        window = self.windows.get(key)
        if limits.quota is not None and window is not None:
            self.store.note(key, window[0] + self.offset, window[1], limits.window_s)

    def charge(self, client: CounterKey, items: int, limits: Limits, now: float) -> Decision:
        decision = super().charge(client, items, limits, now)
        if decision.allowed:
            self._note(client, limits)
        return decision

    def refund(self, client: CounterKey, items: int, limits: Limits, now: float) -> None:
        super().refund(client, items, limits, now)
        self._note(client, limits)


def open_counters(quota_state: str | None, api_keys_file: str | None, flush_s: float) -> Counters:
    """The counters a server (or the Ray Serve limits actor) charges: kept in SQLite unless ``--quota-state none``."""
    path = quota_state_path(quota_state, api_keys_file)
    if path is None:
        return Counters()
    counters = PersistentCounters(QuotaStore(path, flush_s))
    log.info("quota counters kept in %s (written every %g ms; a crash loses at most that)", path, flush_s * 1000)
    return counters


def check_quota_state(quota_state: str | None, api_keys_file: str | None) -> None:
    """For the CLI, before anything starts: the quota state file can be opened (and made); ``ValueError`` names it."""
    path = quota_state_path(quota_state, api_keys_file)
    if path is None:
        return
    try:
        with sqlite3.connect(str(path)) as db:
            db.execute(_SCHEMA)
        db.close()
    except sqlite3.Error as exc:
        raise ValueError(
            f"{path}: cannot keep the quota counters there ({exc}); give --quota-state PATH, or --quota-state none"
        ) from None


def close_counters(counters: Counters) -> None:
    if isinstance(counters, PersistentCounters):
        counters.store.close()
