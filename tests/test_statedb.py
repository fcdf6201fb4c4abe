"""Tests for meshd.agent.statedb: round trips, atomic counters, locking, durability."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from meshd.agent.interface import CheckSpec, Registration
from meshd.agent.statedb import (
    DB_FILE,
    SCHEMA_VERSION,
    StateDB,
    StateError,
    registration_from_json,
    registration_to_json,
)
from meshd.wire import AppRecord

REPO = Path(__file__).resolve().parent.parent


def reg(
    instance: str = "orders-1",
    check: CheckSpec | None = None,
    meta: dict[str, str] | None = None,
    **kw: object,
) -> Registration:
    fields: dict[str, object] = {
        "app": "orders",
        "instance": instance,
        "address": "192.0.2.3",
        "port": 3500,
    }
    fields.update(kw)
    return Registration(
        record=AppRecord(**fields, meta=AppRecord.make_meta(meta)),  # type: ignore[arg-type]
        check=check,
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / DB_FILE


@pytest.fixture
def db(db_path: Path):
    d = StateDB.open(db_path)
    yield d
    d.close()


# ---------------------------------------------------------------------------
# Registrations


CHECKS = [
    None,
    CheckSpec(kind="ttl", ttl=10.0),
    CheckSpec(kind="ttl", ttl=0.25),
    CheckSpec(kind="http", target="http://127.0.0.1:3500/healthz", interval=5.0),
    CheckSpec(kind="tcp", target="127.0.0.1:3500", interval=2.5),
    CheckSpec(kind="tcp", target="[::1]:3500", interval=1.0),
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.kind if c else "none")
def test_put_load_round_trip_each_check_kind(db: StateDB, check: CheckSpec | None) -> None:
    r = reg(
        check=check,
        meta={"zone": "a", "version": "1.2", "ünï": "çødé"},
        namespace="shop",
        protocol="grpc",
        weight=7,
        health="warning",
    )
    db.put_registration(r, version=3)
    assert db.load_registrations() == [r]
    assert db.get_counter("version") == 3


def test_round_trip_survives_reopen(db_path: Path) -> None:
    r = reg(check=CheckSpec(kind="ttl", ttl=10.0), meta={"k": "v"})
    with StateDB.open(db_path) as d:
        d.put_registration(r, 1)
    with StateDB.open(db_path) as d:
        assert d.load_registrations() == [r]


def test_put_replaces_and_load_orders_by_instance(db: StateDB) -> None:
    db.put_registration(reg("b"), 1)
    db.put_registration(reg("a"), 2)
    newer = reg("b", port=9000, check=CheckSpec(kind="ttl", ttl=3.0))
    db.put_registration(newer, 3)
    assert [r.record.instance for r in db.load_registrations()] == ["a", "b"]
    assert db.load_registrations()[1] == newer


def test_delete(db: StateDB) -> None:
    db.put_registration(reg("a"), 1)
    db.put_registration(reg("b"), 2)
    assert db.delete_registration("a", 3) is True
    assert [r.record.instance for r in db.load_registrations()] == ["b"]
    assert db.get_counter("version") == 3


def test_delete_unknown_writes_nothing(db: StateDB) -> None:
    db.put_registration(reg("a"), 5)
    assert db.delete_registration("nope", 6) is False
    assert db.get_counter("version") == 5  # no change published, no version used


def test_version_must_not_go_down_and_failed_put_writes_nothing(db: StateDB) -> None:
    db.put_registration(reg("a"), 5)
    with pytest.raises(ValueError, match="must not go down"):
        db.put_registration(reg("b"), 4)
    assert [r.record.instance for r in db.load_registrations()] == ["a"]
    assert db.get_counter("version") == 5


def test_put_rejects_invalid_check(db: StateDB) -> None:
    with pytest.raises(ValueError):
        db.put_registration(reg(check=CheckSpec(kind="ttl", ttl=0.0)), 1)
    assert db.load_registrations() == []


def test_json_helpers_round_trip() -> None:
    r = reg(
        check=CheckSpec(kind="http", target="https://x.example/h", interval=0.5), meta={"a": "b"}
    )
    doc = registration_to_json(r)
    assert doc["record"]["meta"] == {"a": "b"}
    assert registration_from_json(json.loads(json.dumps(doc))) == r


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["record"].update(port="80"),
        lambda d: d["record"].update(port=True),
        lambda d: d["record"].pop("health"),
        lambda d: d["record"].update(meta=["a"]),
        lambda d: d["record"].update(meta={"a": 1}),
        lambda d: d["record"].update(health="sick"),
        lambda d: d.update(check={"kind": "udp", "target": "", "interval": 1.0, "ttl": 0.0}),
        lambda d: d.update(check={"kind": "tcp", "target": "nohost", "interval": 1.0, "ttl": 0}),
        lambda d: d.update(check={"kind": "http", "target": "ftp://x/", "interval": 1.0, "ttl": 0}),
        lambda d: d.update(check={"kind": "ttl"}),
    ],
)
def test_registration_from_json_rejects_malformed(mutate) -> None:
    doc = registration_to_json(reg())
    mutate(doc)
    with pytest.raises(ValueError):
        registration_from_json(doc)


def test_bad_rows_are_skipped_with_a_warning(
    db: StateDB, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = reg("good")
    db.put_registration(good, 1)
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute(
            "INSERT INTO registrations VALUES ('garbled', '{not json', NULL, 0)",
        )
        bad = registration_to_json(reg("bad-port"))["record"] | {"port": 0}
        raw.execute("INSERT INTO registrations VALUES ('bad-port', ?, NULL, 0)", (json.dumps(bad),))
        other = registration_to_json(reg("other"))["record"]
        raw.execute(
            "INSERT INTO registrations VALUES ('mismatch', ?, NULL, 0)", (json.dumps(other),)
        )
    raw.close()
    with caplog.at_level(logging.WARNING, logger="meshd.statedb"):
        assert db.load_registrations() == [good]
    skipped = " ".join(rec.getMessage() for rec in caplog.records)
    for name in ("garbled", "bad-port", "mismatch"):
        assert name in skipped


# ---------------------------------------------------------------------------
# Counters and peers


def test_counters(db: StateDB) -> None:
    assert db.get_counter("incarnation") == 0
    assert db.get_counter("version") == 0
    db.set_counters(incarnation=4, version=9)
    assert (db.get_counter("incarnation"), db.get_counter("version")) == (4, 9)
    db.set_counters(incarnation=5)
    assert (db.get_counter("incarnation"), db.get_counter("version")) == (5, 9)


def test_set_counters_is_one_transaction(db: StateDB) -> None:
    db.set_counters(incarnation=4, version=9)
    with pytest.raises(ValueError):
        db.set_counters(incarnation=10, version=8)  # version would go down
    assert (db.get_counter("incarnation"), db.get_counter("version")) == (4, 9)


@pytest.mark.parametrize("bad", [-1, True, 1.5, 2**63])
def test_set_counters_rejects_non_counters(db: StateDB, bad: object) -> None:
    with pytest.raises(ValueError):
        db.set_counters(version=bad)  # type: ignore[arg-type]


def test_peers_order_and_replacement(db: StateDB) -> None:
    assert db.load_peers() == []
    db.save_peers([("192.0.2.3:7946", "n3"), ("192.0.2.1:7946", "n1"), ("192.0.2.2:7946", "n2")])
    assert db.load_peers() == ["192.0.2.3:7946", "192.0.2.1:7946", "192.0.2.2:7946"]
    db.save_peers(
        iter([("192.0.2.2:7946", "n2"), ("192.0.2.9:7946", "n9"), ("192.0.2.2:7946", "x")])
    )
    assert db.load_peers() == ["192.0.2.2:7946", "192.0.2.9:7946"]


def test_peers_most_recent_first_by_last_seen(db: StateDB, db_path: Path) -> None:
    db.save_peers([("a:1", "a"), ("b:1", "b"), ("c:1", "c")])
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute("UPDATE peers SET last_seen = last_seen + 10 WHERE address = 'c:1'")
        raw.execute("UPDATE peers SET last_seen = last_seen - 10 WHERE address = 'a:1'")
    raw.close()
    assert db.load_peers() == ["c:1", "b:1", "a:1"]


# ---------------------------------------------------------------------------
# Opening: pragmas, locking, bad files


def test_creates_parent_dir_and_sets_durable_pragmas(db: StateDB, db_path: Path) -> None:
    assert db_path.is_file()
    conn = db._conn
    assert conn is not None
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION


def test_second_open_on_same_dir_is_refused(db: StateDB, db_path: Path) -> None:
    with pytest.raises(StateError, match="in use by another meshd agent") as e:
        StateDB.open(db_path)
    assert str(db_path.parent) in str(e.value)
    assert f"pid {os.getpid()}" in str(e.value)
    # The refused open must not have disturbed the holder.
    db.put_registration(reg(), 1)
    assert len(db.load_registrations()) == 1


def test_close_releases_the_directory(db_path: Path) -> None:
    d = StateDB.open(db_path)
    d.close()
    d.close()  # idempotent
    with StateDB.open(db_path):
        pass


def test_corrupt_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / DB_FILE
    path.write_bytes(b"this is not sqlite at all \x00\xff" * 200)
    with pytest.raises(StateError) as e:
        StateDB.open(path)
    assert str(path) in str(e.value)
    # A failed open releases the lock: fixing the file lets the next open succeed.
    path.unlink()
    with StateDB.open(path):
        pass


def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / DB_FILE
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE something_else (x)")
    raw.commit()
    raw.close()
    with pytest.raises(StateError, match="not a meshd database") as e:
        StateDB.open(path)
    assert str(path) in str(e.value)


def test_newer_schema_is_refused(db_path: Path) -> None:
    with StateDB.open(db_path):
        pass
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    raw.close()
    with pytest.raises(StateError, match="newer than this meshd") as e:
        StateDB.open(db_path)
    assert str(db_path) in str(e.value)


def test_closed_db_raises(db_path: Path) -> None:
    d = StateDB.open(db_path)
    d.close()
    with pytest.raises(RuntimeError):
        d.load_registrations()


# ---------------------------------------------------------------------------
# Durability across SIGKILL


def test_committed_registration_survives_sigkill(db_path: Path) -> None:
    child = textwrap.dedent(
        """
        import os, signal, sys
        from pathlib import Path
        from meshd.agent.interface import CheckSpec, Registration
        from meshd.agent.statedb import StateDB
        from meshd.wire import AppRecord

        db = StateDB.open(Path(sys.argv[1]))
        rec = AppRecord(app="orders", instance="orders-9", address="192.0.2.9", port=80,
                        meta=AppRecord.make_meta({"k": "v"}))
        db.put_registration(Registration(rec, CheckSpec(kind="ttl", ttl=5.0)), 42)
        db.set_counters(incarnation=7)
        os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit, no flush
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", child, str(db_path)], env=env, capture_output=True, timeout=30
    )
    assert proc.returncode == -9, proc.stderr.decode()
    # The kernel released the dead agent's lock, so a new one may open the dir.
    with StateDB.open(db_path) as d:
        regs = d.load_registrations()
        assert [r.record.instance for r in regs] == ["orders-9"]
        assert regs[0].record.meta == (("k", "v"),)
        assert regs[0].check == CheckSpec(kind="ttl", ttl=5.0)
        assert d.get_counter("version") == 42
        assert d.get_counter("incarnation") == 7


def test_wan_peers_are_kept_apart_from_lan_peers(tmp_path):
    db = StateDB.open(tmp_path / "meshd.db")
    try:
        db.save_peers([("127.0.0.1:7946", "east/n1")])
        db.save_peers([("127.0.0.1:8302", "west/b1")], "wan")
        assert db.load_peers() == ["127.0.0.1:7946"]
        assert db.load_peers("wan") == ["127.0.0.1:8302"]
        db.save_peers([], "wan")
        assert db.load_peers("wan") == [] and db.load_peers() == ["127.0.0.1:7946"]
    finally:
        db.close()
