"""Tests for meshd.agent.statedb: round trips, atomic counters, locking, durability."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from meshd.agent.interface import CheckSpec, Registration
from meshd.agent.statedb import (
    DB_FILE,
    INDEX,
    INDEX_BLOCK,
    INDEX_FLOOR_MAX,
    INDEX_PER_SECOND,
    MAX_INDEX,
    SCHEMA_VERSION,
    IndexReservation,
    StateDB,
    StateError,
    StateWriteError,
    index_floor,
    index_start,
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


def test_maintenance_is_stored_per_registration_and_goes_with_it(db: StateDB) -> None:
    db.put_registration(reg("a"), 1)
    db.put_registration(reg("b"), 2)
    db.set_maintenance("a", "upgrade")
    db.set_maintenance("b", "")
    db.set_maintenance("a", "kernel patch")  # a new reason replaces the old
    assert db.load_maintenance() == {"a": "kernel patch", "b": ""}
    db.set_maintenance("b", None)
    db.set_maintenance("b", None)  # taking out what is not in: nothing happens
    assert db.load_maintenance() == {"a": "kernel patch"}
    # The row goes with its registration: registering the instance again
    # later does not bring the old maintenance back.
    assert db.delete_registration("a", 3)
    db.put_registration(reg("a"), 4)
    assert db.load_maintenance() == {}


def test_a_row_for_an_instance_never_registered_is_not_loaded(db: StateDB) -> None:
    db.set_maintenance("ghost", "left over")
    assert db.load_maintenance() == {}


@pytest.mark.parametrize(
    ("version", "tables"),
    [(3, ("maintenance", "check_state")), (4, ("check_state",))],
    ids=["before-maintenance", "before-check-state"],
)
def test_a_file_of_an_earlier_schema_gains_the_new_tables(
    db_path: Path, version: int, tables: tuple[str, ...]
) -> None:
    with StateDB.open(db_path) as d:
        d.put_registration(reg("a"), 1)
    raw = sqlite3.connect(db_path)
    with raw:  # back to what the build before those tables wrote
        for table in tables:
            raw.execute(f"DROP TABLE {table}")
        raw.execute("UPDATE schema_version SET version = ?", (version,))
    raw.close()
    with StateDB.open(db_path) as d:
        assert [r.record.instance for r in d.load_registrations()] == ["a"]
        assert d.load_maintenance() == {}
        d.set_maintenance("a", "upgrade")
        assert d.load_maintenance() == {"a": "upgrade"}
        assert d.load_check_states() == {}
        d.set_check_state("a", "passing", "ok", 1e9)
        assert d.load_check_states() == {"a": ("passing", "ok", 1e9)}


def test_a_ttl_check_state_goes_with_its_registration_and_its_check(db: StateDB) -> None:
    ttl = CheckSpec(kind="ttl", ttl=30.0)
    db.put_registration(reg("a", check=ttl), 1)
    db.set_check_state("a", "warning", "slow", 2e9)
    db.set_check_state("ghost", "passing", "", 2e9)  # never registered: not loaded
    assert db.load_check_states() == {"a": ("warning", "slow", 2e9)}
    db.put_registration(reg("a", check=ttl), 2)  # the same check: kept
    assert db.load_check_states() == {"a": ("warning", "slow", 2e9)}
    db.put_registration(reg("a", check=CheckSpec(kind="ttl", ttl=60.0)), 3)
    assert db.load_check_states() == {}  # another check: the old report says nothing
    db.set_check_state("a", "passing", "", 2e9)
    assert db.delete_registration("a", 4)
    db.put_registration(reg("a", check=ttl), 5)
    assert db.load_check_states() == {}  # gone with its registration
    with pytest.raises(ValueError, match="status must be one of"):
        db.set_check_state("a", "up", "", 2e9)


def test_a_garbled_check_state_row_is_skipped(
    db: StateDB, caplog: pytest.LogCaptureFixture
) -> None:
    db.put_registration(reg("a", check=CheckSpec(kind="ttl", ttl=30.0)), 1)
    db.put_registration(reg("b", check=CheckSpec(kind="ttl", ttl=30.0)), 2)
    db.set_check_state("a", "passing", "", 2e9)
    db.set_check_state("b", "passing", "", 2e9)
    conn = db._conn
    assert conn is not None
    with conn:  # hand-edited rows
        conn.execute("UPDATE check_state SET status = 'up' WHERE instance = 'a'")
        conn.execute("UPDATE check_state SET expires = 'soon' WHERE instance = 'b'")
    with caplog.at_level(logging.WARNING):
        assert db.load_check_states() == {}
    assert sum("skipping stored check state" in r.getMessage() for r in caplog.records) == 2


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


# ---------------------------------------------------------------------------
# The served index: never back across restarts, whatever the clock says


@pytest.mark.parametrize(
    ("wall", "floor"),
    [
        (0.0, 0),
        (-5.0, 0),  # a clock before 1970
        (math.nan, 0),
        (math.inf, 0),
        (1.9, INDEX_PER_SECOND),  # whole seconds only
        (1_700_000_000.5, 1_700_000_000 * INDEX_PER_SECOND),
        (1e30, INDEX_FLOOR_MAX),  # a clock far in the future cannot use up the range
    ],
)
def test_index_floor_pins_the_formula(wall: float, floor: int) -> None:
    assert index_floor(wall) == floor


def test_index_start_is_above_the_ceiling_and_the_floor_and_in_range() -> None:
    assert index_start(0, 0.0) == 1  # never 0: Consul clients read 0 as "no index"
    assert index_start(-7, math.nan) == 1  # a hand-edited counter
    assert index_start(41, 0.0) == 42
    assert index_start(41, 100.0) == 100 * INDEX_PER_SECOND  # the clock raises it
    assert index_start(10**15, 100.0) == 10**15 + 1  # but never lowers it
    assert index_start(2**63 - 1, 0.0) == MAX_INDEX
    assert index_start(MAX_INDEX - 1, 1e30) == MAX_INDEX


class FakeClock:
    """Wall-clock readings in the order given: forward, back, or nonsense."""

    def __init__(self, *readings: float) -> None:
        self.readings = list(readings)

    def __call__(self) -> float:
        return self.readings.pop(0)


def test_the_index_only_grows_across_lives_whatever_the_clock(db_path: Path) -> None:
    # Year 2023, then the clock set back a day, to 1970, not a number, far
    # ahead, and back to 2023: every life serves above all earlier ones.
    clock = FakeClock(1.7e9, 1.7e9 - 86400, 0.0, math.nan, 1.8e9, 1.7e9, 1.7e9 + 1)
    rng = random.Random(11)
    served: list[int] = []
    for life in range(7):
        with StateDB.open(db_path) as db:
            index = IndexReservation(db, clock())
            # Strictly above: the last life may have served its last index
            # for other records than this one starts with.
            assert index.value(0) > (served[-1] if served else 0), life
            served.append(index.value(0))
            changes = 0
            for _ in range(rng.randrange(1, 5)):
                # What the agent does after each change: reserve, then serve.
                changes += rng.choice((0, 1, rng.randrange(INDEX_BLOCK)))
                index.reserve(changes)
                value = index.value(changes)
                assert value == index.base + changes  # reserved ahead, never capped here
                assert value <= index.ceiling <= db.get_counter(INDEX)
                served.append(value)
    assert served == sorted(served) and served[0] >= 1
    # The clock's floor set the start when it was ahead; the stored ceiling
    # won when the clock went back.
    assert served[0] == index_start(0, 1.7e9)


def test_the_index_start_survives_sigkill(db_path: Path) -> None:
    # The child reserves past one block and serves up to there, then dies
    # without closing; the next life must start above all it served.
    child = textwrap.dedent(
        """
        import os, signal, sys
        from pathlib import Path
        from meshd.agent.statedb import INDEX_BLOCK, IndexReservation, StateDB

        db = StateDB.open(Path(sys.argv[1]))
        index = IndexReservation(db, 0.0)
        changes = INDEX_BLOCK
        index.reserve(changes)
        print(index.value(changes), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", child, str(db_path)], env=env, capture_output=True, timeout=30
    )
    assert proc.returncode == -9, proc.stderr.decode()
    last_served = int(proc.stdout)
    assert last_served == 1 + INDEX_BLOCK
    with StateDB.open(db_path) as db:
        # A clock at 1970 cannot help: the stored ceiling alone does it.
        assert IndexReservation(db, 0.0).value(0) > last_served


def test_an_emptied_database_does_not_take_the_index_back(db_path: Path) -> None:
    with StateDB.open(db_path) as db:
        index = IndexReservation(db, 0.0)
        index.reserve(3 * INDEX_BLOCK)
        last_served = index.value(3 * INDEX_BLOCK)
    db_path.unlink()  # the marker still says what the database held
    with StateDB.open(db_path) as db:
        assert IndexReservation(db, 0.0).value(0) > last_served


class RefusingDB:
    """A StateDB stand-in whose writes fail while ``full`` (a full disk)."""

    path = Path("meshd.db")

    def __init__(self) -> None:
        self.full = False
        self.stored = 0

    def start_index(self, wall: float) -> tuple[int, int]:
        base = index_start(self.stored, wall)
        self.stored = base + INDEX_BLOCK
        return base, self.stored

    def set_counters(self, **values: int) -> None:
        if self.full:
            raise StateWriteError("the disk of state directory /x is full", full=True)
        self.stored = max(self.stored, values[INDEX])


def test_a_refused_reservation_holds_the_index_at_what_is_on_disk() -> None:
    db = RefusingDB()
    index = IndexReservation(db, 0.0)  # type: ignore[arg-type]
    db.full = True
    changes = INDEX_BLOCK // 2
    with pytest.raises(StateWriteError):
        index.reserve(changes)
    assert index.value(changes) == index.base + changes  # still inside the block
    # Past the block the index stays at the stored ceiling: a restart starts
    # above it, so nothing served is ever undercut.
    assert index.value(3 * INDEX_BLOCK) == db.stored == index.ceiling
    db.full = False
    index.reserve(3 * INDEX_BLOCK)
    assert index.value(3 * INDEX_BLOCK) == index.base + 3 * INDEX_BLOCK <= db.stored
    assert IndexReservation(db, 0.0).value(0) > index.value(3 * INDEX_BLOCK)  # type: ignore[arg-type]


def test_an_index_at_the_top_stays_there_and_is_said(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with StateDB.open(db_path) as db:
        db.set_counters(**{INDEX: 2**63 - 1})  # what a hand edit could leave
    with StateDB.open(db_path) as db, caplog.at_level(logging.WARNING):
        index = IndexReservation(db, 1.7e9)
        index.reserve(10**6)  # no write, no error: there is nowhere to go
        assert index.value(0) == index.value(10**6) == MAX_INDEX
        assert db.get_counter(INDEX) == 2**63 - 1
    assert any("at its maximum" in r.getMessage() for r in caplog.records)


def test_dead_documents_are_kept_with_their_first_time_of_death(db_path: Path) -> None:
    with StateDB.open(db_path) as db:
        db.save_dead([("east/a", b"one", 100.0), ("east/b", b"two", 50.0)], [])
        db.save_dead([("east/a", b"newer", 999.0)], ["east/b", "east/unknown"])
    with StateDB.open(db_path) as db:
        assert db.load_dead() == [("east/a", b"newer", 100.0)]
