"""What lasts across restarts: one agent's durable state in ``<state_dir>/meshd.db``.

The file holds the node's own registrations (what the API acknowledged), the
``version`` and ``incarnation`` counters (both must only grow, across restarts
too: a peer ignores an origin state or a liveness claim that is not newer than
what it has) and the last known peers, so a restarted agent can rejoin
without ``--join``.

Durability: WAL journal with ``synchronous=FULL``, so a transaction is on
disk (WAL fsynced) when ``COMMIT`` returns; every write method commits before
it returns.  A registration and the version it was published under are
written in one transaction, so after a crash the stored version is never
older than a stored registration.

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
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from meshd.agent.checks import validate_spec
from meshd.agent.interface import CheckSpec, Registration
from meshd.wire import AppRecord

log = logging.getLogger("meshd.statedb")

DB_FILE = "meshd.db"
LOCK_FILE = "meshd.lock"
#: How long to wait for SQLite's own file lock before giving up.  With the
#: flock in place only a foreign process (a backup tool, sqlite3 shell) can
#: hold it; waiting longer would only delay a clear error.
BUSY_TIMEOUT_S = 5.0
#: Counters the agent keeps.  Others may be added; these two are the contract
#: with the protocol core.
VERSION = "version"
INCARNATION = "incarnation"

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
)
_PEER_TABLES = {"lan": "peers", "wan": "wan_peers"}
SCHEMA_VERSION = len(MIGRATIONS)


class StateError(Exception):
    """The state file cannot be used; the message is one sentence naming it."""


# ---------------------------------------------------------------------------
# JSON form of a registration.  Floats are kept as floats (not the contract's
# "10s" strings, which round to milliseconds) so a round trip is exact.


def registration_to_json(reg: Registration) -> dict[str, Any]:
    """``{"record": {...all AppRecord fields, meta as object}, "check": {...} | None}``."""
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
    }
    check = None
    if reg.check is not None:
        c = reg.check
        check = {"kind": c.kind, "target": c.target, "interval": c.interval, "ttl": c.ttl}
    return {"record": record, "check": check}


_RECORD_FIELDS = frozenset(
    ("app", "instance", "address", "port", "namespace", "protocol", "meta", "weight", "health")
)
_CHECK_FIELDS = frozenset(("kind", "target", "interval", "ttl"))


def registration_from_json(obj: Any) -> Registration:
    """Inverse of :func:`registration_to_json`; raises ValueError on anything malformed."""
    if not isinstance(obj, dict):
        raise ValueError("a registration must be an object")
    record = obj.get("record")
    if not isinstance(record, dict) or set(record) != _RECORD_FIELDS:
        raise ValueError(f"a record must have exactly the fields {sorted(_RECORD_FIELDS)}")
    meta = record["meta"]
    if not isinstance(meta, dict):
        raise ValueError("meta must be an object")
    # AppRecord validates every field (types, names, limits) and raises WireError,
    # a ValueError.
    rec = AppRecord(**{**record, "meta": AppRecord.make_meta(meta)})
    raw_check = obj.get("check")
    check = None
    if raw_check is not None:
        if not isinstance(raw_check, dict) or set(raw_check) != _CHECK_FIELDS:
            raise ValueError(f"a check must have exactly the fields {sorted(_CHECK_FIELDS)}")
        check = CheckSpec(**raw_check)
        validate_spec(check)
    return Registration(record=rec, check=check)


# ---------------------------------------------------------------------------


class StateDB:
    """The agent's SQLite state.  Build with :meth:`open`; :meth:`close` when done."""

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int) -> None:
        # Use open(): it takes the lock and migrates before anything else runs.
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._lock_fd: int | None = lock_fd
        self._mutex = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> StateDB:
        """Open (creating if needed) the state file ``path``, usually ``<state_dir>/meshd.db``."""
        path = Path(path)
        state_dir = path.parent
        try:
            # 0700: the state directory also holds dev-mode keys.
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state directory {state_dir}: {exc.strerror}") from exc
        lock_fd = _lock_state_dir(state_dir)
        conn = None
        try:
            conn = _connect(path)
            _migrate(conn, path)
        except BaseException:
            if conn is not None:
                conn.close()
            os.close(lock_fd)
            raise
        return cls(path, conn, lock_fd)

    def close(self) -> None:
        """Close the file and release the state directory.  Safe to call twice."""
        with self._mutex:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> StateDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- registrations ----------------------------------------------------------

    def load_registrations(self) -> list[Registration]:
        """Every stored registration, by instance.  Invalid rows are skipped with a warning.

        A bad row (hand-edited file, a bug in an older build) must not keep
        the agent from starting; dropping it is what the operator would do.
        """
        with self._read() as conn:
            rows = conn.execute(
                "SELECT instance, record, check_spec FROM registrations ORDER BY instance"
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
            except (ValueError, TypeError) as exc:
                log.warning("%s: skipping stored registration %r: %s", self.path, instance, exc)
                continue
            out.append(reg)
        return out

    def put_registration(self, reg: Registration, version: int) -> None:
        """Store ``reg`` (insert or replace) and set the version counter, atomically.

        ``version`` must not be below the stored one (ValueError): versions
        only grow, and this is the last place that can catch a regression.
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
        with self._write() as conn:
            _bump(conn, VERSION, version)
            conn.execute(
                "INSERT OR REPLACE INTO registrations (instance, record, check_spec, updated_at)"
                " VALUES (?, ?, ?, ?)",
                (reg.record.instance, record, check, time.time()),
            )

    def delete_registration(self, instance: str, version: int) -> bool:
        """Delete ``instance`` and set the version counter, atomically.

        False, and nothing written, when ``instance`` is not stored: no change
        was published, so the version must not move.
        """
        with self._write() as conn:
            cur = conn.execute("DELETE FROM registrations WHERE instance = ?", (instance,))
            if cur.rowcount == 0:
                return False
            _bump(conn, VERSION, version)
        return True

    # -- counters ----------------------------------------------------------------

    def get_counter(self, name: str) -> int:
        """The counter ``name``, 0 when never set."""
        with self._read() as conn:
            row = conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return 0 if row is None else int(row[0])

    def set_counters(self, **values: int) -> None:
        """Set several counters in one transaction.  A value below the stored one raises."""
        with self._write() as conn:
            for name, value in values.items():
                _bump(conn, name, value)

    # -- peers ---------------------------------------------------------------------

    def save_peers(self, peers: Iterable[tuple[str, str]], pool: str = "lan") -> None:
        """Replace the peer list with ``(address, node)`` pairs, most recent first.

        All get ``last_seen = now``; among equal times the given order is kept
        (rowid), so the caller's order is what :meth:`load_peers` returns.  A
        repeated address keeps its first place.
        """
        table = _PEER_TABLES[pool]
        now = time.time()
        rows = [(str(a), str(n), now) for a, n in peers]
        with self._write() as conn:
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

    # -- plumbing ------------------------------------------------------------------

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
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed (fsynced) on success, rolled back on error."""
        with self._mutex:
            conn = self._conn
            if conn is None:
                raise RuntimeError(f"state file {self.path} is closed")
            try:
                # IMMEDIATE takes the write lock now, so a foreign writer makes
                # us fail here rather than halfway through.
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StateError(f"cannot write state file {self.path}: {exc}") from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StateError(f"cannot write state file {self.path}: {exc}") from exc
                raise


def _bump(conn: sqlite3.Connection, name: str, value: int) -> None:
    # Counters are sent to peers as wire integers (unsigned, < 2**63).
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ValueError(f"counter {name} must be an integer from 0 to 2**63-1, not {value!r}")
    row = conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
    if row is not None and value < row[0]:
        raise ValueError(f"counter {name} must not go down ({row[0]} -> {value})")
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
