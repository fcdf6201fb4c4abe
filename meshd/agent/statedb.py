"""What lasts across restarts: one agent's durable state in ``<state_dir>/meshd.db``.

The file holds the node's own registrations (what the API acknowledged),
which of them are in maintenance, the last report of each TTL check and when
it runs out, the ``version`` and ``incarnation``
counters (both must only grow, across restarts too: a peer ignores an origin
state or a liveness claim that is not newer than what it has) and the last
known peers, so a restarted agent can rejoin without ``--join``.

Durability: WAL journal with ``synchronous=FULL``, so a transaction is on
disk (WAL fsynced) when ``COMMIT`` returns; every write method commits before
it returns.  The stored version never lags a stored registration: either
the registration's transaction sets it, or (the agent's way, see
``put_registration(reg, None)``) a reservation covering it was committed
before.

Exclusivity: two agents on one state directory would publish conflicting
states under the same versions.  An ``flock`` on ``<state_dir>/meshd.lock``,
held while the object lives, refuses the second one.  The kernel drops the
lock when the process dies, however it dies.

Schema: ``schema_version`` holds one row; :data:`MIGRATIONS` are applied in
order, each with its version bump, in one transaction.  Append migrations,
never edit a released one.

Thread safety: methods may be called from worker threads (the agent runs
them in ``asyncio.to_thread`` so an fsync never stalls the event loop); one
lock serialises them on the single connection.

Failed writes: a write the disk refuses (full, quota, I/O error) is rolled
back and raises :class:`StateWriteError`, an
:class:`~meshd.agent.interface.StorageError` the API answers 507 or 503;
:attr:`StateDB.problem` names it until a later write succeeds.

Files and modes: the state directory is created 0700 and every file in it
0600, whatever the umask (a registration's meta may be private, and the
directory also holds dev-mode keys).  An existing directory open to others
is left as the operator made it, with a warning; files we own are tightened.

The served index: blocking queries compare the index a client holds with
the agent's, so it must never go back, across restarts and SIGKILL too (a
client holding a higher one would wait out its whole ``wait``).  The ``index``
counter is a ceiling committed *before* any index up to it is served; a new
life starts above the stored ceiling, and above a floor read from the wall
clock (:func:`index_floor`) so that even a lost or fresh state directory
(``--dev``) does not start low while the clock is right.  The clock only ever
raises the start: with the ceiling stored, a clock set back changes nothing.
:class:`IndexReservation` is the whole scheme; the agent adds its store's
change count to the base.

Loss detection: a database that lost committed data (``-wal`` deleted after a
crash, file emptied, an old backup restored) looks like a valid, older one.
So every write that changes a counter or the registrations also writes
``<state_dir>/meshd.marker`` (atomically, after the commit and a checkpoint):
the counters and the number of registrations.  Counters only grow, so a
database whose counters are below the marker's has lost data: open logs one
warning and raises the counters to the marker's, so no version or
incarnation is ever used twice.  After each such write the WAL is
checkpointed into the main file, so deleting the ``-wal`` file costs at most
the peer list saved since.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from meshd.agent.checks import validate_spec
from meshd.agent.interface import HEALTH, CheckSpec, Registration, StorageError
from meshd.wire import AppRecord

log = logging.getLogger("meshd.statedb")

DB_FILE = "meshd.db"
LOCK_FILE = "meshd.lock"
#: What the database held at its last write; see "Loss detection".  Not named
#: ``meshd.db.*``: an operator clearing the database with a glob keeps it.
MARKER_FILE = "meshd.marker"
MARKER_FORMAT = 1
#: Directory and file modes, set whatever the umask.
DIR_MODE = 0o700
FILE_MODE = 0o600
#: How long to wait for SQLite's own file lock before giving up.  With the
#: flock in place only a foreign process (a backup tool, sqlite3 shell) can
#: hold it; waiting longer would only delay a clear error.
BUSY_TIMEOUT_S = 5.0
#: Counters the agent keeps.  Others may be added; these two are the contract
#: with the protocol core.
VERSION = "version"
INCARNATION = "incarnation"
#: Counts registration writes, so the marker also catches a lost write that
#: moved no other counter (versions are reserved in blocks).
WRITES = "registration_writes"
#: The ceiling of the served blocking-query index (see "The served index").
INDEX = "index"
#: Indexes reserved per write: a busy mesh changes its store a few thousand
#: times a second at most, so this costs an fsync every few seconds at worst.
INDEX_BLOCK = 1 << 16
#: The clock's floor climbs this many indexes a second: above any sustained
#: change rate, so a life that lost its state directory still starts above
#: what the last one served, if the clock is right.
INDEX_PER_SECOND = 1 << 16
#: The floor stops at 2**53 (year 6325 by the formula): a clock far in the
#: future must not push the index where JavaScript clients lose precision
#: (their numbers are exact up to 2**53), nor use up the range for good.
INDEX_FLOOR_MAX = 1 << 53
#: The highest index served.  X-Consul-Index is the index plus one and must
#: stay a signed 64-bit integer (2**63 - 1), which some clients parse it as.
MAX_INDEX = 2**63 - 2

#: Migration n (1-based) brings the schema from version n-1 to n.  Each is a
#: list of single statements (executescript would commit mid-migration).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # ``check_spec`` rather than ``check``: CHECK is an SQL keyword.
        """CREATE TABLE registrations (
            instance TEXT PRIMARY KEY,
            record TEXT NOT NULL,
            check_spec TEXT,
            updated_at REAL NOT NULL
        )""",
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        """CREATE TABLE peers (
            address TEXT PRIMARY KEY,
            node TEXT NOT NULL,
            last_seen REAL NOT NULL
        )""",
    ),
    (
        # A bridge's WAN peers, so it rejoins the WAN pool after a restart
        # without --wan-join, as it rejoins its LAN pool from ``peers``.
        """CREATE TABLE wan_peers (
            address TEXT PRIMARY KEY,
            node TEXT NOT NULL,
            last_seen REAL NOT NULL
        )""",
    ),
    (
        # Dead nodes' last documents (signed, as received), so the Consul
        # inventory lists them critical across a restart of this agent.
        """CREATE TABLE dead_docs (
            origin TEXT PRIMARY KEY,
            signed BLOB NOT NULL,
            dead_since REAL NOT NULL
        )""",
    ),
    (
        # Instances in maintenance mode and its reason, so a restarted agent
        # does not publish them healthy (Consul keeps its maintenance check
        # across a restart too).  A row goes with its registration.
        """CREATE TABLE maintenance (
            instance TEXT PRIMARY KEY,
            reason TEXT NOT NULL
        )""",
    ),
    (
        # The last report of an instance's TTL check and when it runs out
        # (wall-clock seconds), so a restart within the TTL keeps what the app
        # said, as Consul keeps a TTL check's state.  A row goes with its
        # registration, and with its check when a registration changes it.
        """CREATE TABLE check_state (
            instance TEXT PRIMARY KEY,
            status TEXT NOT NULL,
            output TEXT NOT NULL,
            expires REAL NOT NULL
        )""",
    ),
)
_PEER_TABLES = {"lan": "peers", "wan": "wan_peers"}
SCHEMA_VERSION = len(MIGRATIONS)


class StateError(Exception):
    """The state file cannot be used; the message is one sentence naming it."""


class StateWriteError(StateError, StorageError):
    """A write the disk refused; it was rolled back, so nothing of it is stored."""


# ---------------------------------------------------------------------------
# JSON form of a registration.  Floats are kept as floats (not the contract's
# "10s" strings, which round to milliseconds) so a round trip is exact.


def registration_to_json(reg: Registration) -> dict[str, Any]:
    """``{"record": {...all AppRecord fields, meta as object}, "check": {...} | None}``.

    Every field of the record is written, so a test that builds a record with
    each field set and reads it back catches a field added to AppRecord but
    not here (how ``export`` was once lost, publishing local-only apps
    everywhere after a restart).
    """
    r = reg.record
    record = {
        "app": r.app,
        "instance": r.instance,
        "address": r.address,
        "port": r.port,
        "namespace": r.namespace,
        "protocol": r.protocol,
        "meta": dict(r.meta),
        "weight": r.weight,
        "health": r.health,
        "export": None if r.export is None else list(r.export),
    }
    check = None
    if reg.check is not None:
        c = reg.check
        check = {"kind": c.kind, "target": c.target, "interval": c.interval, "ttl": c.ttl}
    return {"record": record, "check": check}


_RECORD_FIELDS = frozenset(
    (
        "app",
        "instance",
        "address",
        "port",
        "namespace",
        "protocol",
        "meta",
        "weight",
        "health",
        "export",
    )
)
#: Rows written before ``export`` was stored lack it; they read as exported
#: everywhere, which is what those builds published after a restart anyway.
_OPTIONAL_RECORD_FIELDS = frozenset(("export",))
_CHECK_FIELDS = frozenset(("kind", "target", "interval", "ttl"))


def registration_from_json(obj: Any) -> Registration:
    """Inverse of :func:`registration_to_json`; raises ValueError on anything malformed."""
    if not isinstance(obj, dict):
        raise ValueError("a registration must be an object")
    record = obj.get("record")
    if not isinstance(record, dict) or not (
        _RECORD_FIELDS - _OPTIONAL_RECORD_FIELDS <= set(record) <= _RECORD_FIELDS
    ):
        raise ValueError(f"a record must have exactly the fields {sorted(_RECORD_FIELDS)}")
    meta = record["meta"]
    if not isinstance(meta, dict):
        raise ValueError("meta must be an object")
    export = record.get("export")
    if export is not None and not isinstance(export, list):
        raise ValueError("export must be a list or null")
    # AppRecord validates every field (types, names, limits) and raises WireError,
    # a ValueError.
    rec = AppRecord(
        **{
            **record,
            "meta": AppRecord.make_meta(meta),
            "export": None if export is None else tuple(export),
        }
    )
    raw_check = obj.get("check")
    check = None
    if raw_check is not None:
        if not isinstance(raw_check, dict) or set(raw_check) != _CHECK_FIELDS:
            raise ValueError(f"a check must have exactly the fields {sorted(_CHECK_FIELDS)}")
        check = CheckSpec(**raw_check)
        validate_spec(check)
    return Registration(record=rec, check=check)


# ---------------------------------------------------------------------------
# The served index (module doc, "The served index").  Pure functions, so the
# scheme can be checked against any clock.


def index_floor(wall: float) -> int:
    """The lowest index a life starting at wall-clock time ``wall`` (Unix
    seconds) begins at: :data:`INDEX_PER_SECOND` per second, capped at
    :data:`INDEX_FLOOR_MAX`; 0 for a clock before 1970 or not a number."""
    if not math.isfinite(wall) or wall <= 0:
        return 0
    return min(int(wall) * INDEX_PER_SECOND, INDEX_FLOOR_MAX)


def index_start(stored_ceiling: int, wall: float) -> int:
    """The first index of a new life: above every index the last one could
    serve (at most ``stored_ceiling``), at least the clock's floor, at least 1
    (Consul clients read 0 as "no index"), at most :data:`MAX_INDEX`."""
    return min(max(stored_ceiling + 1, index_floor(wall), 1), MAX_INDEX)


class IndexReservation:
    """The served index of one agent life: ``base + changes``, where
    ``changes`` is the caller's own count since the start (the store's index),
    never above a ceiling already committed to the state file.

    ``value`` is what may be served; ``reserve`` moves the ceiling ahead of the
    changes (one write per :data:`INDEX_BLOCK`).  While a write fails the
    value stays at the ceiling: a stalled index is safe, one that a restart
    could undercut is not.
    """

    def __init__(self, db: StateDB, wall: float) -> None:
        self._db = db
        self.base, self.ceiling = db.start_index(wall)
        if self.base >= MAX_INDEX:
            log.warning(
                "the blocking-query index stored in %s is at its maximum (%d): blocking "
                "queries will not see changes until the counter %r is lowered by hand",
                db.path,
                MAX_INDEX,
                INDEX,
            )

    def value(self, changes: int) -> int:
        return min(self.base + changes, self.ceiling)

    def reserve(self, changes: int) -> None:
        """Commit a new ceiling when ``changes`` came within half a block of the
        current one.  StorageError (nothing changed) when the disk refuses."""
        upcoming = self.base + changes + INDEX_BLOCK // 2
        if upcoming < self.ceiling or self.ceiling >= MAX_INDEX:
            return
        ceiling = min(self.base + changes + INDEX_BLOCK, MAX_INDEX)
        self._db.set_counters(**{INDEX: ceiling})
        # Only once it is on disk: see the class doc.
        self.ceiling = ceiling


# ---------------------------------------------------------------------------


class StateDB:
    """The agent's SQLite state.  Build with :meth:`open`; :meth:`close` when done."""

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int) -> None:
        # Use open(): it takes the lock and migrates before anything else runs.
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._lock_fd: int | None = lock_fd
        self._mutex = threading.Lock()
        self._marker = path.parent / MARKER_FILE
        #: Why the last write failed (one sentence); None once a write succeeds.
        self.problem: str | None = None
        #: Called with every failed write, from whichever thread wrote.
        self.on_error: Callable[[StateWriteError], None] | None = None

    @classmethod
    def open(cls, path: Path) -> StateDB:
        """Open (creating if needed) the state file ``path``, usually ``<state_dir>/meshd.db``."""
        path = Path(path)
        state_dir = path.parent
        ensure_state_dir(state_dir, warn=True)
        lock_fd = _lock_state_dir(state_dir)
        conn = None
        try:
            # Read before SQLite touches anything: opening creates a -wal file.
            marker, marker_problem = _read_marker(state_dir / MARKER_FILE)
            wal_was_there = _wal_path(path).exists()
            _create_private(path)
            conn = _connect(path)
            _migrate(conn, path)
            _tighten(path)
            db = cls(path, conn, lock_fd)
            if marker_problem is not None:
                log.warning(
                    "%s; cannot tell whether %s lost changes this time", marker_problem, path
                )
            db._reconcile(marker, wal_was_there)
        except BaseException:
            if conn is not None:
                conn.close()
            os.close(lock_fd)
            raise
        return db

    def close(self) -> None:
        """Close the file and release the state directory.  Safe to call twice."""
        with self._mutex:
            if self._conn is not None:
                snapshot = None
                with contextlib.suppress(sqlite3.Error):
                    snapshot = _snapshot(self._conn)
                # The last connection's close checkpoints and removes the WAL.
                self._conn.close()
                self._conn = None
                if snapshot is not None:
                    # Before the flock goes: the next agent reads a finished marker.
                    self._write_marker(*snapshot, clean=True)
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> StateDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- registrations ----------------------------------------------------------

    def load_registrations(self) -> list[Registration]:
        """Every stored registration, oldest write first.  Invalid rows are skipped
        with a warning (and left in the file for the operator to look at).

        A bad row (hand-edited file, a bug in an older build) must not keep
        the agent from starting; dropping it is what the operator would do.
        Oldest first because when not all can be published the agent keeps
        the earliest: those were acknowledged before the rest.
        """
        with self._read() as conn:
            rows = conn.execute(
                "SELECT instance, record, check_spec FROM registrations"
                " ORDER BY updated_at, instance"
            ).fetchall()
        out = []
        for instance, record, check in rows:
            try:
                reg = registration_from_json(
                    {
                        "record": json.loads(record),
                        "check": None if check is None else json.loads(check),
                    }
                )
                if reg.record.instance != instance:
                    raise ValueError(f"row key differs from its record's {reg.record.instance!r}")
            except (ValueError, TypeError, RecursionError) as exc:
                log.warning("%s: skipping stored registration %r: %s", self.path, instance, exc)
                continue
            out.append(reg)
        return out

    def put_registration(self, reg: Registration, version: int | None) -> None:
        """Store ``reg`` (insert or replace) and set the version counter, atomically.

        ``version`` must not be below the stored one (ValueError): versions
        only grow, and this is the last place that can catch a regression.
        None leaves the counter alone, for a caller that reserved versions
        in an earlier commit.  StateWriteError when the disk refuses: then
        nothing was stored.
        """
        if reg.check is not None:
            validate_spec(reg.check)
        doc = registration_to_json(reg)
        record = json.dumps(doc["record"], separators=(",", ":"), sort_keys=True)
        check = (
            None
            if doc["check"] is None
            else json.dumps(doc["check"], separators=(",", ":"), sort_keys=True)
        )
        with self._write(marker=True) as conn:
            if version is not None:
                _bump(conn, VERSION, version)
            _bump(conn, WRITES, _counter(conn, WRITES) + 1)
            row = conn.execute(
                "SELECT check_spec FROM registrations WHERE instance = ?", (reg.record.instance,)
            ).fetchone()
            if row is not None and row[0] != check:
                # A report of the old check says nothing about the new one.
                conn.execute("DELETE FROM check_state WHERE instance = ?", (reg.record.instance,))
            conn.execute(
                "INSERT OR REPLACE INTO registrations (instance, record, check_spec, updated_at)"
                " VALUES (?, ?, ?, ?)",
                (reg.record.instance, record, check, time.time()),
            )

    def delete_registration(self, instance: str, version: int | None) -> bool:
        """Delete ``instance`` and set the version counter (None: leave it), atomically.

        False, and nothing written, when ``instance`` is not stored: no change
        was published, so the version must not move.
        """
        with self._write(marker=True) as conn:
            cur = conn.execute("DELETE FROM registrations WHERE instance = ?", (instance,))
            if cur.rowcount == 0:
                return False
            conn.execute("DELETE FROM maintenance WHERE instance = ?", (instance,))
            conn.execute("DELETE FROM check_state WHERE instance = ?", (instance,))
            if version is not None:
                _bump(conn, VERSION, version)
            _bump(conn, WRITES, _counter(conn, WRITES) + 1)
        return True

    # -- maintenance -------------------------------------------------------------

    def load_maintenance(self) -> dict[str, str]:
        """Instance -> reason, for the stored registrations in maintenance."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT m.instance, m.reason FROM maintenance AS m"
                " JOIN registrations AS r ON r.instance = m.instance"
            ).fetchall()
        return {instance: str(reason) for instance, reason in rows}

    def set_maintenance(self, instance: str, reason: str | None) -> None:
        """Put ``instance`` in maintenance with ``reason``, or (None) take it out.

        Committed when this returns; StateWriteError when the disk refuses,
        and then nothing changed.
        """
        with self._write() as conn:
            if reason is None:
                conn.execute("DELETE FROM maintenance WHERE instance = ?", (instance,))
            else:
                conn.execute(
                    "INSERT OR REPLACE INTO maintenance (instance, reason) VALUES (?, ?)",
                    (instance, reason),
                )

    # -- TTL check state ---------------------------------------------------------

    def load_check_states(self) -> dict[str, tuple[str, str, float]]:
        """Instance -> (status, output, expires) of the stored registrations'
        last TTL reports.  A row that is not one (a hand-edited file) is
        skipped with a warning: the instance then starts critical."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT c.instance, c.status, c.output, c.expires FROM check_state AS c"
                " JOIN registrations AS r ON r.instance = c.instance"
            ).fetchall()
        out = {}
        for instance, status, output, expires in rows:
            if (
                status not in HEALTH
                or not isinstance(output, str)
                or not isinstance(expires, float)
                or not math.isfinite(expires)
            ):
                log.warning("%s: skipping stored check state of %r", self.path, instance)
                continue
            out[str(instance)] = (str(status), output, expires)
        return out

    def set_check_state(self, instance: str, status: str, output: str, expires: float) -> None:
        """Store the last report of ``instance``'s TTL check, good until
        ``expires`` (wall-clock seconds).

        Committed when this returns; StateWriteError when the disk refuses,
        and then nothing changed.
        """
        if status not in HEALTH:
            raise ValueError(f"status must be one of {', '.join(HEALTH)}")
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO check_state (instance, status, output, expires)"
                " VALUES (?, ?, ?, ?)",
                (instance, status, output, expires),
            )

    # -- counters ----------------------------------------------------------------

    def get_counter(self, name: str) -> int:
        """The counter ``name``, 0 when never set."""
        with self._read() as conn:
            return _counter(conn, name)

    def set_counters(self, **values: int) -> None:
        """Set several counters in one transaction.  A value below the stored one raises."""
        with self._write(marker=True) as conn:
            for name, value in values.items():
                _bump(conn, name, value)

    def start_index(self, wall: float) -> tuple[int, int]:
        """(base, ceiling) of a new life's served index; the ceiling is
        committed before this returns (see :class:`IndexReservation`)."""
        with self._write(marker=True) as conn:
            stored = _counter(conn, INDEX)
            base = index_start(stored, wall)
            ceiling = min(base + INDEX_BLOCK, MAX_INDEX)
            if ceiling > stored:
                _bump(conn, INDEX, ceiling)
            else:  # the stored ceiling is at the top already (a hand edit)
                ceiling = base
        return base, ceiling

    # -- peers ---------------------------------------------------------------------

    def save_peers(self, peers: Iterable[tuple[str, str]], pool: str = "lan") -> None:
        """Replace the peer list with ``(address, node)`` pairs, most recent first.

        All get ``last_seen = now``; among equal times the given order is kept
        (rowid), so the caller's order is what :meth:`load_peers` returns.  A
        repeated address keeps its first place.  Best effort: the list only
        saves a ``--join`` after a restart, so a full disk is noted in
        :attr:`problem` and logged, not raised.
        """
        table = _PEER_TABLES[pool]
        now = time.time()
        rows = [(str(a), str(n), now) for a, n in peers]
        with contextlib.suppress(StateWriteError), self._write() as conn:
            conn.execute(f"DELETE FROM {table}")
            conn.executemany(
                f"INSERT OR IGNORE INTO {table} (address, node, last_seen) VALUES (?, ?, ?)", rows
            )

    def load_peers(self, pool: str = "lan") -> list[str]:
        """Addresses of the last known peers of ``pool``, most recently seen first."""
        table = _PEER_TABLES[pool]
        with self._read() as conn:
            rows = conn.execute(f"SELECT address FROM {table} ORDER BY last_seen DESC, rowid")
            return [r[0] for r in rows]

    # -- dead nodes' documents -------------------------------------------------------

    def save_dead(self, added: Iterable[tuple[str, bytes, float]], removed: Iterable[str]) -> None:
        """Remember ``(origin, signed state bytes, wall time of death)``, forget
        ``removed``.  Best effort, as the peers: a full disk is noted in
        :attr:`problem` and logged, and the inventory only loses them at a restart."""
        with contextlib.suppress(StateWriteError), self._write() as conn:
            conn.executemany("DELETE FROM dead_docs WHERE origin = ?", [(o,) for o in removed])
            conn.executemany(
                "INSERT INTO dead_docs (origin, signed, dead_since) VALUES (?, ?, ?)"
                " ON CONFLICT(origin) DO UPDATE SET signed = excluded.signed",
                list(added),
            )

    def load_dead(self) -> list[tuple[str, bytes, float]]:
        """Every remembered dead document, the longest dead first."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT origin, signed, dead_since FROM dead_docs ORDER BY dead_since, origin"
            )
            return [(str(o), bytes(b), float(t)) for o, b, t in rows]

    # -- loss detection --------------------------------------------------------------

    def _reconcile(self, marker: dict[str, Any] | None, wal_was_there: bool) -> None:
        """Compare the database with the marker of its last write (see module doc)."""
        with self._read() as conn:
            counters, count = _snapshot(conn)
        if marker is not None:
            behind = {
                name: value
                for name, value in marker["counters"].items()
                if counters.get(name, 0) < value
            }
            version = marker["counters"].get(VERSION, 0)
            if behind and count == 0 and not any(counters.values()):
                log.warning(
                    "state database %s was emptied or replaced; it held %d registrations at "
                    "version %d; starting with none, counters moved past the old ones",
                    self.path,
                    marker["registrations"],
                    version,
                )
            elif behind:
                log.warning(
                    "state database %s is older than its last write (it has %d registrations "
                    "and version %d, it had %d and %d): changes were lost, e.g. its -wal file "
                    "was deleted after a crash or an old copy restored; counters moved past "
                    "the old ones",
                    self.path,
                    count,
                    counters.get(VERSION, 0),
                    marker["registrations"],
                    version,
                )
            elif not marker["clean"] and not wal_was_there:
                log.warning(
                    "state database %s: its -wal file was missing after an unclean stop "
                    "(deleted?); the database matches its last write, so nothing was lost",
                    self.path,
                )
            if behind:
                # Raised, never repeated: an origin version used twice with
                # other content would be two truths.
                self.set_counters(**behind)
                return
        # Also marks the database in use (clean=False) until close().
        with self._mutex:
            self._write_marker(counters, count, clean=False)

    def _write_marker(self, counters: dict[str, int], count: int, clean: bool) -> bool:
        """Replace the marker atomically; False if that failed.  A failure is
        noted, never raised: the change it follows is committed, only its loss
        detection is behind (a marker behind the database is still right)."""
        doc = {
            "format": MARKER_FORMAT,
            "database": self.path.name,
            "counters": counters,
            "registrations": count,
            "clean": clean,
        }
        data = (json.dumps(doc, sort_keys=True) + "\n").encode()
        tmp = self._marker.with_name(MARKER_FILE + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            try:
                os.fchmod(fd, FILE_MODE)
                view = memoryview(data)
                while view:  # a write may be short; a full disk then raises
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._marker)
            dir_fd = os.open(self._marker.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            full = exc.errno in _FULL_ERRNOS
            self._failed(
                StateWriteError(
                    f"cannot update {self._marker}: {exc.strerror or exc}; the change itself "
                    "was stored",
                    full=full,
                )
            )
            return False
        return True

    # -- plumbing ------------------------------------------------------------------

    def _failed(self, err: StateWriteError) -> None:
        if err.message != self.problem:
            log.error("%s", err.message)  # one line per problem, not per retry
        self.problem = err.message
        if self.on_error is not None:
            self.on_error(err)

    def _succeeded(self) -> None:
        if self.problem is not None:
            log.warning("state directory %s is writable again", self.path.parent)
            self.problem = None

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._mutex:
            if self._conn is None:
                raise RuntimeError(f"state file {self.path} is closed")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise StateError(f"cannot read state file {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def _write(self, marker: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed (fsynced) on success, rolled back on error.

        ``marker``: the transaction changes counters or registrations, so
        checkpoint it into the main file and record it in the marker.
        """
        with self._mutex:
            conn = self._conn
            if conn is None:
                raise RuntimeError(f"state file {self.path} is closed")
            try:
                # IMMEDIATE takes the write lock now, so a foreign writer makes
                # us fail here rather than halfway through.
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                err = _write_error(self.path, exc)
                self._failed(err)
                raise err from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    err = _write_error(self.path, exc)
                    self._failed(err)
                    raise err from exc
                raise
            # After a failure the marker may be behind: any write that got
            # through brings it up to date, and only then is the state healthy.
            if marker or self.problem is not None:
                try:
                    # PASSIVE never waits; with one connection it copies the
                    # whole WAL, so a deleted -wal file loses none of this.
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    counters, count = _snapshot(conn)
                except sqlite3.Error as exc:
                    self._failed(_write_error(self.path, exc, committed=True))
                    return
                if not self._write_marker(counters, count, clean=False):
                    return
            self._succeeded()


#: errno values that mean "no room": the disk is full, or the user's quota is.
_FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e)


def _write_error(path: Path, exc: sqlite3.Error, committed: bool = False) -> StateWriteError:
    """A refused write as one sentence, classified as full disk or not."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    lowered = text.lower()
    tail = "the change itself was stored" if committed else "nothing was stored"
    if name == "SQLITE_FULL" or "full" in lowered or "quota" in lowered:
        return StateWriteError(
            f"the disk of state directory {path.parent} is full ({text}); {tail}", full=True
        )
    if name.startswith("SQLITE_IOERR") or "i/o" in lowered or "disk" in lowered:
        return StateWriteError(f"cannot write state file {path}: disk I/O error ({text}); {tail}")
    if "locked" in lowered or "busy" in lowered:
        return StateWriteError(f"state file {path} is locked by another process; {tail}")
    return StateWriteError(f"cannot write state file {path}: {text}; {tail}")


def _counter(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
    # A value that is not an integer (a hand edit) reads as 0, like a lost
    # one: the marker comparison at open then raises it past the old values.
    return row[0] if row is not None and type(row[0]) is int else 0


def _snapshot(conn: sqlite3.Connection) -> tuple[dict[str, int], int]:
    """(every counter, number of registrations): what the marker records."""
    counters = {
        str(name): value
        for name, value in conn.execute("SELECT name, value FROM counters")
        if isinstance(value, int)
    }
    (count,) = conn.execute("SELECT COUNT(*) FROM registrations").fetchone()
    return counters, int(count)


def _read_marker(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(marker, None), (None, None) when there is none, or (None, why unusable)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror}"
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        doc = None
    ok = (
        isinstance(doc, dict)
        and doc.get("format") == MARKER_FORMAT
        and isinstance(doc.get("counters"), dict)
        and all(
            isinstance(k, str) and type(v) is int and 0 <= v < 2**63
            for k, v in doc["counters"].items()
        )
        and type(doc.get("registrations")) is int
        and isinstance(doc.get("clean"), bool)
    )
    if not ok:
        return None, f"{path} is not a meshd marker"
    return doc, None


def ensure_state_dir(state_dir: Path, warn: bool = False) -> None:
    """Create ``state_dir`` 0700 (whatever the umask), or check an existing one.

    An existing directory open to other users is the operator's to change
    (it may be shared on purpose); ``warn`` logs one line about it.
    """
    state_dir = Path(state_dir)
    try:
        state_dir.mkdir(mode=DIR_MODE, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StateError(f"cannot create state directory {state_dir}: {exc.strerror}") from exc
    else:
        try:
            os.chmod(state_dir, DIR_MODE)  # mkdir's mode was cut by the umask
        except OSError as exc:
            raise StateError(f"cannot set the mode of {state_dir}: {exc.strerror}") from exc
        return
    if not state_dir.is_dir():
        raise StateError(f"state directory {state_dir} exists and is not a directory")
    mode = stat.S_IMODE(state_dir.stat().st_mode)
    if warn and mode & 0o077:
        log.warning(
            "state directory %s is open to other users (mode %03o); meshd leaves an existing "
            "directory as it is: run chmod 700 on it unless that is intended",
            state_dir,
            mode,
        )


def _wal_path(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def _create_private(path: Path) -> None:
    """Create an empty database file 0600, so SQLite's -wal and -shm copy that mode."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    except OSError as exc:
        raise StateError(f"cannot create state file {path}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, FILE_MODE)  # the umask may have cut it below what we need
    finally:
        os.close(fd)


def _tighten(path: Path) -> None:
    """Make the files we own 0600 (an older meshd created them 0644)."""
    for p in (path, _wal_path(path), path.with_name(path.name + "-shm")):
        try:
            mode = stat.S_IMODE(p.stat().st_mode)
            if mode & 0o077:
                os.chmod(p, FILE_MODE)
                log.warning("%s was open to other users (mode %03o); made it 0600", p, mode)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot make %s 0600: %s", p, exc.strerror)


def _bump(conn: sqlite3.Connection, name: str, value: int) -> None:
    # Counters are sent to peers as wire integers (unsigned, < 2**63).
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ValueError(f"counter {name} must be an integer from 0 to 2**63-1, not {value!r}")
    stored = _counter(conn, name)
    if value < stored:
        raise ValueError(f"counter {name} must not go down ({stored} -> {value})")
    conn.execute("INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)", (name, value))


def _lock_state_dir(state_dir: Path) -> int:
    lock_path = state_dir / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StateError(f"cannot open lock file {lock_path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        who = f" (pid {holder})" if holder else ""
        raise StateError(
            f"state directory {state_dir} is in use by another meshd agent{who}"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise StateError(f"cannot lock {lock_path}: {exc.strerror}") from exc
    # The pid is for the operator reading the error above; the lock is the flock.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def _connect(path: Path) -> sqlite3.Connection:
    try:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a
        # transaction spans exactly what the method says and nothing commits
        # behind our back.  check_same_thread=False: see "Thread safety".
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise StateError(f"cannot open state file {path}: {exc}") from exc
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        conn.execute("PRAGMA synchronous=FULL")
    except sqlite3.Error as exc:
        conn.close()
        raise _classify(path, exc) from exc
    if str(mode).lower() != "wal":
        # Some filesystems (network mounts) refuse WAL; synchronous=FULL keeps
        # commits durable in rollback-journal mode too, only slower.
        log.warning("%s: WAL journal not available (mode %s); commits will be slower", path, mode)
    return conn


def _classify(path: Path, exc: sqlite3.Error) -> StateError:
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return StateError(f"state file {path} is locked by another process")
    if isinstance(exc, sqlite3.DatabaseError) and (
        "not a database" in text or "malformed" in text or "corrupt" in text
    ):
        return StateError(f"state file {path} is not a meshd database or is corrupt")
    return StateError(f"cannot use state file {path}: {exc}")


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = _schema_version(conn, path)
            if current > SCHEMA_VERSION:
                raise StateError(
                    f"state file {path} has schema version {current}, newer than this "
                    f"meshd understands ({SCHEMA_VERSION}); upgrade meshd"
                )
            if current == 0:
                conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            for n in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[n - 1]:
                    conn.execute(statement)
                conn.execute("UPDATE schema_version SET version = ?", (n,))
                log.debug("%s: migrated schema to version %d", path, n)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise _classify(path, exc) from exc


def _schema_version(conn: sqlite3.Connection, path: Path) -> int:
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "schema_version" not in tables:
        if tables:
            # Someone else's SQLite file: migrating it would mix our tables in.
            raise StateError(f"state file {path} is an SQLite file but not a meshd database")
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    if row is None or not isinstance(row[0], int):
        raise StateError(f"state file {path} has no valid schema version")
    return row[0]
