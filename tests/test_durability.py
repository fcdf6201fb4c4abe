"""Atomic, durable requests (issue 9, item 8).

What must hold, and how each part is shown:

- Limits are checked before anything is written: the pure check
  (``meshd.agent.limits``) against the wire's own encoder, then real agents
  refusing the 513th registration and one that would break the byte cap,
  restarted afterwards with exactly what was acknowledged.
- Stored data never keeps an agent from starting: rows that cannot all be
  published are dropped one by one with a log line (in process and real).
- Every field of a registration comes back after SIGKILL, export scope
  included (real agent).
- A full disk refuses the request with 507, changes nothing, turns
  ``/v1/health`` degraded and counts it: injected on an in-process agent,
  and on a real one with a 1 MiB tmpfs when the test may mount one.
- Modes 0700/0600 on a fresh state directory whatever the umask (real agent).
- A deleted WAL or an emptied database is noticed, and versions never go
  back (state file and real agents).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time as time_module
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import meshd.agent.agent as agent_module
from meshd.agent.interface import CheckSpec, Registration
from meshd.agent.limits import Publisher, publish_problem
from meshd.agent.statedb import (
    DB_FILE,
    MARKER_FILE,
    StateDB,
    StateWriteError,
    ensure_state_dir,
)
from meshd.wire import (
    MAX_APPS_PER_ORIGIN,
    MAX_META_BYTES,
    MAX_ORIGIN_BODY_BYTES,
    AppRecord,
    OriginState,
    scope_for,
)
from tests.agents import AgentProc, wait_until
from tests.local_agent import TLS, Local, start_local, stop_local, write_tls

# ---------------------------------------------------------------------------
# Helpers


def record(instance: str, meta_bytes: int = 0, **kw: Any) -> AppRecord:
    """A record whose meta totals about ``meta_bytes`` UTF-8 bytes (at most the cap)."""
    meta: dict[str, str] = {}
    left = meta_bytes
    i = 0
    while left > 0:
        key = f"k{i:02d}"
        value = "v" * min(left - len(key), 200)
        meta[key] = value
        left -= len(key) + len(value)
        i += 1
    fields: dict[str, Any] = {"app": "orders", "instance": instance, "address": "192.0.2.3"}
    fields.update(port=3500, meta=AppRecord.make_meta(meta))
    fields.update(kw)
    return AppRecord(**fields)


BIG_META = MAX_META_BYTES - 64  # leaves room for the key names


def big_meta_body(port: int = 3500, **extra: Any) -> dict[str, Any]:
    rec = record("x", BIG_META)
    return {"app": "orders", "address": "127.0.0.1", "port": port, "meta": dict(rec.meta), **extra}


WHO = Publisher(node="n1", cluster="east", region="r1", zone="z1")


def one_sentence(text: str) -> bool:
    return bool(text) and "\n" not in text and text.count(". ") == 0


# ---------------------------------------------------------------------------
# The pure limit check


def test_count_cap_is_checked_on_the_whole_node() -> None:
    apps = [record(f"i{n:03d}") for n in range(MAX_APPS_PER_ORIGIN)]
    assert publish_problem(apps, WHO) is None
    problem = publish_problem([*apps, record("one-more")], WHO)
    assert problem == ("this node already publishes 512 app records, the most one node may publish")
    # Split across audiences it is still one node's records: refused as well.
    scoped = [replace(a, export=()) if n % 2 else a for n, a in enumerate(apps)]
    assert publish_problem([*scoped, record("one-more", export=())], WHO) == problem


def test_byte_cap_is_checked_per_document_at_its_worst() -> None:
    apps: list[AppRecord] = []
    while publish_problem(apps, WHO) is None:
        apps.append(record(f"i{len(apps):03d}", BIG_META))
    accepted = apps[:-1]
    problem = publish_problem(apps, WHO)
    assert problem is not None and one_sentence(problem)
    assert "document for every cluster would exceed 131072 bytes" in problem
    # Checking only the document the newest record joins gives the same answer.
    assert publish_problem(apps, WHO, apps[-1]) == problem
    assert publish_problem(accepted, WHO, accepted[-1]) is None
    assert publish_problem([*apps[:-1], record("x", BIG_META, export=())], WHO) is None
    # What was accepted can be signed in the worst case the core will meet:
    # every record critical (the longest health) at the largest version.
    worst = tuple(replace(a, health="critical") for a in accepted)
    state = OriginState("n1", "east", "r1", "z1", 2**63 - 1, worst)
    assert len(state.encode()) <= MAX_ORIGIN_BODY_BYTES
    # ...and the refused set could not: the check is not merely conservative.
    over = tuple(replace(a, health="passing") for a in apps)
    with pytest.raises(ValueError, match="encodes to at most"):
        OriginState("n1", "east", "r1", "z1", 1, over).encode()
    # Another audience is another document, with room of its own.
    local = [record(f"l{n:03d}", BIG_META, export=()) for n in range(len(accepted))]
    assert publish_problem([*accepted, *local], WHO) is None
    problem = publish_problem([*accepted, *local, record("l-more", BIG_META, export=())], WHO)
    assert problem is not None and "document for its own cluster only" in problem


def test_a_bridge_statement_counts_against_the_main_document() -> None:
    apps: list[AppRecord] = []
    while publish_problem(apps, WHO) is None:
        apps.append(record(f"i{len(apps):03d}", BIG_META))
    fits = apps[:-1]
    bridge = replace(WHO, bridge=True, unreachable=tuple(f"c{n:04d}" for n in range(2000)))
    assert publish_problem(fits, bridge) is not None
    assert scope_for(None) == ""  # the statements ride on the main document only
    assert publish_problem([replace(a, export=()) for a in fits], bridge) is None


# ---------------------------------------------------------------------------
# The state file: every field, injected full disk, loss detection, modes


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


class FullDisk:
    """Stands in for the state file's connection: statements starting with one
    of ``fail_on`` raise SQLite's own full-disk error, as a full disk makes them."""

    def __init__(self, conn: sqlite3.Connection, fail_on: tuple[str, ...] = ("COMMIT",)):
        self._conn = conn
        self.fail_on = fail_on
        self.failures = 0

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql.lstrip().upper().startswith(self.fail_on):
            self.failures += 1
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@contextlib.contextmanager
def disk_full(db: StateDB, fail_on: tuple[str, ...] = ("COMMIT",)) -> Iterator[FullDisk]:
    real = db._conn
    assert real is not None
    fake = FullDisk(real, fail_on)
    db._conn = fake  # type: ignore[assignment]
    try:
        yield fake
    finally:
        db._conn = real


EXPORTS = [None, (), ("west",), ("north", "west")]


@pytest.mark.parametrize("export", EXPORTS, ids=["all", "local", "one", "two"])
def test_every_field_round_trips_through_the_file(state_dir: Path, export: Any) -> None:
    rec = AppRecord(
        app="orders",
        instance="orders-1",
        address="orders.svc.example",
        port=8443,
        namespace="shop",
        protocol="grpc",
        meta=AppRecord.make_meta({"zone": "a", "ünï": "çødé"}),
        weight=7,
        health="warning",
        export=export,
    )
    reg = Registration(rec, CheckSpec(kind="http", target="https://x.example/h", interval=2.5))
    with StateDB.open(state_dir / DB_FILE) as db:
        db.put_registration(reg, None)
    with StateDB.open(state_dir / DB_FILE) as db:
        assert db.load_registrations() == [reg]


def test_rows_written_before_export_was_stored_still_load(state_dir: Path) -> None:
    reg = Registration(record("old-1", 10))
    with StateDB.open(state_dir / DB_FILE) as db:
        db.put_registration(reg, 1)
    raw = sqlite3.connect(state_dir / DB_FILE)
    with raw:
        (text,) = raw.execute("SELECT record FROM registrations").fetchone()
        old = json.loads(text)
        del old["export"]
        raw.execute("UPDATE registrations SET record = ?", (json.dumps(old),))
    raw.close()
    with StateDB.open(state_dir / DB_FILE) as db:
        assert db.load_registrations() == [reg]


def test_a_full_disk_raises_stores_nothing_and_is_remembered(state_dir: Path) -> None:
    db = StateDB.open(state_dir / DB_FILE)
    seen: list[StateWriteError] = []
    db.on_error = seen.append
    db.put_registration(Registration(record("a")), 10)
    marker = (state_dir / MARKER_FILE).read_bytes()
    for fail_on in (("COMMIT",), ("INSERT",), ("BEGIN",)):
        with disk_full(db, fail_on), pytest.raises(StateWriteError) as info:
            db.put_registration(Registration(record("b")), 20)
        err = info.value
        assert err.full and err.status == 507
        assert one_sentence(err.message) and "full" in err.message
        assert err.message.endswith("nothing was stored")
        assert db.problem == err.message
    assert len(seen) == 3
    assert [r.record.instance for r in db.load_registrations()] == ["a"]
    assert db.get_counter("version") == 10
    assert (state_dir / MARKER_FILE).read_bytes() == marker
    # Peers are a cache: a refused save is remembered, not raised.
    with disk_full(db):
        db.save_peers([("127.0.0.1:1", "x")])
    assert db.problem is not None and len(seen) == 4
    db.put_registration(Registration(record("b")), 20)
    assert db.problem is None
    db.close()


def test_a_marker_that_cannot_be_written_keeps_the_change_but_degrades(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = StateDB.open(state_dir / DB_FILE)
    seen: list[StateWriteError] = []
    db.on_error = seen.append
    real_replace = os.replace

    def no_room(src: Any, dst: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", no_room)
    db.put_registration(Registration(record("a")), 10)  # committed: no raise
    assert [r.record.instance for r in db.load_registrations()] == ["a"]
    assert len(seen) == 1 and seen[0].full
    assert db.problem is not None and db.problem.endswith("the change itself was stored")
    assert not (state_dir / (MARKER_FILE + ".tmp")).exists()
    # A peer-list save does not clear it while the marker still cannot be written.
    db.save_peers([("127.0.0.1:1", "x")])
    assert db.problem is not None and len(seen) == 2
    monkeypatch.setattr(os, "replace", real_replace)
    db.save_peers([("127.0.0.1:1", "x")])  # brings the marker up to date
    assert db.problem is None
    assert json.loads((state_dir / MARKER_FILE).read_text())["registrations"] == 1
    db.close()


def test_an_io_error_is_a_storage_error_but_not_a_full_disk(state_dir: Path) -> None:
    with StateDB.open(state_dir / DB_FILE) as db:
        real = db._conn

        class IOFail(FullDisk):
            def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
                if sql.startswith("COMMIT"):
                    raise sqlite3.OperationalError("disk I/O error")
                return self._conn.execute(sql, *args)

        assert real is not None
        db._conn = IOFail(real)  # type: ignore[assignment]
        try:
            with pytest.raises(StateWriteError) as info:
                db.set_counters(version=5)
        finally:
            db._conn = real
        assert not info.value.full and info.value.status == 503
        assert "I/O" in info.value.message


def _crash_with(state_dir: Path, registrations: int) -> None:
    """Write like an agent would, then die without closing (as SIGKILL does)."""
    code = (
        "import os\n"
        "from pathlib import Path\n"
        "from meshd.agent.statedb import StateDB\n"
        "from meshd.agent.interface import Registration\n"
        "from meshd.wire import AppRecord\n"
        f"db = StateDB.open(Path({str(state_dir)!r}) / 'meshd.db')\n"
        "db.set_counters(version=db.get_counter('version') + 1000,\n"
        "                incarnation=db.get_counter('incarnation') + 1)\n"
        f"for i in range({registrations}):\n"
        "    rec = AppRecord(app='orders', instance=f'i{i}', address='192.0.2.3', port=80)\n"
        "    db.put_registration(Registration(rec), None)\n"
        "db.save_peers([('127.0.0.1:1', 'x')])\n"
        "os._exit(0)  # no close: as SIGKILL leaves it\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root, timeout=60)


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_deleted_wal_after_a_crash_is_noticed_and_loses_no_registration(
    state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _crash_with(state_dir, 3)
    (state_dir / "meshd.db-wal").unlink()
    with caplog.at_level(logging.WARNING, logger="meshd.statedb"):
        db = StateDB.open(state_dir / DB_FILE)
    lines = _messages(caplog)
    assert len(lines) == 1 and "-wal file was missing after an unclean stop" in lines[0]
    # Every registration write was checkpointed into the main file.
    assert len(db.load_registrations()) == 3
    assert db.get_counter("version") == 1000
    db.close()


# One case in the fast tier; the other two with the slow tests.
@pytest.mark.parametrize(
    "how",
    [
        pytest.param("truncated", marks=pytest.mark.slow),
        "deleted",
        pytest.param("truncated-after-clean-stop", marks=pytest.mark.slow),
    ],
)
def test_an_emptied_database_is_noticed_and_counters_never_go_back(
    state_dir: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    _crash_with(state_dir, 3)
    _crash_with(state_dir, 3)  # a second life: version 2000, incarnation 2
    path = state_dir / DB_FILE
    if how == "truncated-after-clean-stop":
        StateDB.open(path).close()
    if how == "deleted":
        path.unlink()
    else:
        os.truncate(path, 0)
    with caplog.at_level(logging.WARNING, logger="meshd.statedb"):
        db = StateDB.open(path)
    lines = _messages(caplog)
    assert len(lines) == 1, lines
    assert f"state database {path} was emptied or replaced" in lines[0]
    assert "it held 3 registrations at version 2000" in lines[0]
    assert db.load_registrations() == []
    assert db.get_counter("version") == 2000
    assert db.get_counter("incarnation") == 2
    db.close()
    # Said once: the marker now describes the (empty) database.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="meshd.statedb"):
        StateDB.open(path).close()
    assert _messages(caplog) == []


def test_an_old_copy_put_back_is_noticed(state_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = state_dir / DB_FILE
    with StateDB.open(path) as db:
        db.put_registration(Registration(record("a")), 1000)
    old = path.read_bytes()  # closed cleanly: the main file is the whole database
    with StateDB.open(path) as db:
        db.put_registration(Registration(record("b")), 2000)
    path.write_bytes(old)
    with caplog.at_level(logging.WARNING, logger="meshd.statedb"):
        db = StateDB.open(path)
    (line,) = _messages(caplog)
    assert "is older than its last write" in line
    assert "it has 1 registrations and version 1000, it had 2 and 2000" in line
    assert db.get_counter("version") == 2000
    db.close()


def test_a_garbled_counter_is_taken_back_from_the_marker(
    state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = state_dir / DB_FILE
    with StateDB.open(path) as db:
        db.put_registration(Registration(record("a")), 3000)
    raw = sqlite3.connect(path)
    with raw:
        raw.execute("UPDATE counters SET value = 'lots' WHERE name = 'version'")
    raw.close()
    with caplog.at_level(logging.WARNING, logger="meshd.statedb"):
        db = StateDB.open(path)
    (line,) = _messages(caplog)
    assert "is older than its last write" in line
    assert db.get_counter("version") == 3000
    assert len(db.load_registrations()) == 1
    db.close()


def test_an_unreadable_marker_is_said_and_replaced(
    state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    StateDB.open(state_dir / DB_FILE).close()
    (state_dir / MARKER_FILE).write_text("{garbage")
    with caplog.at_level(logging.WARNING, logger="meshd.statedb"):
        StateDB.open(state_dir / DB_FILE).close()
    (line,) = _messages(caplog)
    assert "is not a meshd marker" in line
    assert json.loads((state_dir / MARKER_FILE).read_text())["clean"] is True


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_are_private_whatever_the_umask(state_dir: Path) -> None:
    old = os.umask(0)
    try:
        db = StateDB.open(state_dir / "deeper" / DB_FILE)
        db.put_registration(Registration(record("a")), 1)
        here = state_dir / "deeper"
        assert _mode(here) == 0o700
        for name in (DB_FILE, "meshd.db-wal", "meshd.db-shm", MARKER_FILE, "meshd.lock"):
            assert _mode(here / name) == 0o600, name
        db.close()
    finally:
        os.umask(old)


def test_a_loose_existing_directory_is_warned_about_and_left_alone(
    state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_dir.mkdir(mode=0o755)
    os.chmod(state_dir, 0o755)
    path = state_dir / DB_FILE
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)  # as an older meshd left it
    os.fchmod(fd, 0o644)
    os.close(fd)
    with caplog.at_level(logging.WARNING, logger="meshd.statedb"):
        StateDB.open(path).close()
    text = " ".join(_messages(caplog))
    assert f"state directory {state_dir} is open to other users (mode 755)" in text
    assert _mode(state_dir) == 0o755  # the operator's to change
    assert f"{path} was open to other users (mode 644); made it 0600" in text
    assert _mode(path) == 0o600  # ours
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="meshd.statedb"):
        ensure_state_dir(state_dir)  # what run.py calls first: it leaves the warning to open
    assert _messages(caplog) == []


# ---------------------------------------------------------------------------
# An in-process agent: disk full through the API, stored data that cannot
# all be published


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLS:
    return write_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def local(tls: Any, state_dir: Path) -> AsyncIterator[Local]:
    node = await start_local(tls, state_dir)
    yield node
    with contextlib.suppress(Exception):
        await stop_local(node)


APP = {"app": "orders", "address": "127.0.0.1", "port": 3500}


async def test_a_full_disk_answers_507_and_changes_nothing(
    local: Local, tls: Any, state_dir: Path
) -> None:
    assert (await local.put("/v1/apps/o1", APP))[0] == 200
    apps, records = await local.apps(), local.agent.records()
    version = local.agent.core.version  # type: ignore[union-attr]
    assert await local.get("/v1/health") == (
        200,
        {"status": "ok", "node": "n1", "cluster": "east"},
    )

    with disk_full(local.db):
        status, body = await local.put("/v1/apps/o2", {**APP, "port": 3501})
        assert status == 507
        assert one_sentence(body["error"]) and "is full" in body["error"]
        assert body["error"].endswith("nothing was stored")
        status, body = await local.get("/v1/health")
        assert status == 503
        assert body["status"] == "degraded" and body["node"] == "n1"
        assert "is full" in body["reason"]
        # The other writes of the API and the Consul register map the same way.
        resp = await local.client.delete("/v1/apps/o1")
        assert resp.status == 507
        status, text = await local.put(
            "/v1/agent/service/register", {"ID": "c1", "Name": "orders", "Port": 3502}
        )
        assert status == 507 and "is full" in text and "\n" not in text
        _, text = await local.get("/metrics")
        assert local.metric(text, 'meshd_storage_errors_total{cause="full"}') == 3
        # Maintenance is stored before it takes effect: refused, o1 stays passing.
        resp = await local.client.put("/v1/agent/service/maintenance/o1?enable=true")
        assert resp.status == 507 and "is full" in await resp.text()
        assert local.agent.core.apps["o1"].health == "passing"  # type: ignore[union-attr]
        # A write that needs a fresh block of versions refuses before the
        # core moves, and the ceiling in memory does not run ahead of the file.
        ceiling = local.agent._version_ceiling
        local.agent._version_ceiling = version + 1
        assert (await local.put("/v1/apps/o3", APP))[0] == 507
        assert local.agent._version_ceiling == version + 1
        local.agent._version_ceiling = ceiling
        # Nothing of any refused request reached the core.
        assert await local.apps() == apps
        assert local.agent.records() == records
        assert local.agent.core.version == version  # type: ignore[union-attr]
        _, text = await local.get("/metrics")
        # At least: a timer may also have tried to reserve meanwhile.
        assert local.metric(text, 'meshd_storage_errors_total{cause="full"}') >= 4

    # Nothing half-written on disk either: a restart shows the same.
    await stop_local(local)
    again = await start_local(tls, state_dir)
    try:
        assert await again.apps() == apps
        # The disk has room again: the next write goes through, health is ok.
        with disk_full(again.db):
            assert (await again.put("/v1/apps/o2", APP))[0] == 507
            assert (await again.get("/v1/health"))[0] == 503
        assert (await again.put("/v1/apps/o2", APP))[0] == 200
        assert (await again.get("/v1/health"))[0] == 200
        assert [a["instance"] for a in await again.apps()] == ["o1", "o2"]
    finally:
        await stop_local(again)


async def test_an_unchecked_instances_health_is_stored_before_it_is_acknowledged(
    local: Local, tls: Any, state_dir: Path
) -> None:
    """No check finds it again after a restart, so what the app said must be
    on disk when the API says 200; a refused write changes nothing."""
    assert (await local.put("/v1/apps/o1", APP))[0] == 200
    writes = local.db.get_counter("registration_writes")
    assert (await local.put("/v1/apps/o1/health", {"status": "critical"}))[0] == 200
    assert local.db.get_counter("registration_writes") == writes + 1
    # Saying it again writes nothing.
    assert (await local.put("/v1/apps/o1/health", {"status": "critical"}))[0] == 200
    assert local.db.get_counter("registration_writes") == writes + 1
    with disk_full(local.db):
        status, body = await local.put("/v1/apps/o1/health", {"status": "passing"})
        assert status == 507 and body["error"].endswith("nothing was stored")
        assert local.agent.core.apps["o1"].health == "critical"  # type: ignore[union-attr]
    await stop_local(local)
    again = await start_local(tls, state_dir)
    try:
        assert [(a["instance"], a["health"]) for a in await again.apps()] == [("o1", "critical")]
        # A new registration is the app's latest word again.
        assert (await again.put("/v1/apps/o1", APP))[0] == 200
        assert [a["health"] for a in await again.apps()] == ["passing"]
    finally:
        await stop_local(again)


class _Wall:
    """The agent's wall clock, moved by hand (its loop clock stays real)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def time(self) -> float:
        return self.now

    monotonic = staticmethod(time_module.monotonic)


def _ttl_timer_left(local: Local, instance: str) -> float:
    check = local.agent.runner._checks[instance]
    assert check.timer is not None
    return check.timer.when() - asyncio.get_running_loop().time()


async def test_a_ttl_report_survives_a_restart_until_its_ttl_runs_out(
    local: Local, tls: Any, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As Consul keeps a TTL check's state: what the app last reported is on
    disk when the API says 200, and a restart before it runs out keeps it,
    for what is left of it, never longer."""
    wall = _Wall()
    monkeypatch.setattr(agent_module, "time", wall)
    ttl_app = {**APP, "check": {"ttl": "30s"}}
    assert (await local.put("/v1/apps/o1", ttl_app))[0] == 200

    def health(node: Local) -> str:
        return node.agent.core.apps["o1"].health  # type: ignore[union-attr]

    assert health(local) == "critical"  # not routed to before it reports
    resp = await local.client.put("/v1/agent/check/pass/service:o1?note=all+good")
    assert resp.status == 200
    assert local.db.load_check_states() == {"o1": ("passing", "all good", wall.now + 30)}
    # The same report with more than half the TTL left writes nothing ...
    wall.now += 10
    assert (await local.client.put("/v1/agent/check/pass/service:o1?note=all+good")).status == 200
    assert local.db.load_check_states()["o1"][2] == wall.now + 20
    # ... with less, it moves the stored end; a full disk cannot turn the app
    # critical through that: the report takes effect, the old end stays.
    wall.now += 6
    with disk_full(local.db):
        resp = await local.client.put("/v1/agent/check/pass/service:o1?note=all+good")
        assert resp.status == 200
        assert local.db.load_check_states()["o1"][2] == wall.now + 14
        # A change the disk refuses is refused, and changes nothing.
        resp = await local.client.put("/v1/agent/check/fail/service:o1?note=down")
        assert resp.status == 507 and "is full" in await resp.text()
        assert health(local) == "passing"
    assert (await local.client.put("/v1/agent/check/warn/service:o1?note=slow")).status == 200
    assert local.db.load_check_states() == {"o1": ("warning", "slow", wall.now + 30)}
    assert health(local) == "warning"

    # Restarted 12 s later: still warning, with 18 s of the TTL left.
    await stop_local(local)
    wall.now += 12
    again = await start_local(tls, state_dir)
    try:
        assert health(again) == "warning"
        assert again.agent.runner.status("o1") == "warning"
        assert 17 < _ttl_timer_left(again, "o1") <= 18
        checks = (await again.get("/v1/agent/checks"))[1]
        assert (checks["service:o1"]["Status"], checks["service:o1"]["Output"]) == (
            "warning",
            "slow",
        )
    finally:
        await stop_local(again)
    # Restarted after it ran out: critical until the app reports again.
    wall.now += 19
    again = await start_local(tls, state_dir)
    try:
        assert health(again) == "critical"
        assert again.agent.runner.status("o1") == "critical"
        # A clock set back cannot stretch a report past one TTL.
        assert (await again.client.put("/v1/agent/check/pass/service:o1")).status == 200
    finally:
        await stop_local(again)
    wall.now -= 3600
    again = await start_local(tls, state_dir)
    try:
        assert health(again) == "passing"
        assert _ttl_timer_left(again, "o1") <= 30
        # Another check replaces the report of the old one; so does a deregistration.
        assert (await again.put("/v1/apps/o1", {**APP, "check": {"ttl": "60s"}}))[0] == 200
        assert again.db.load_check_states() == {}
        assert health(again) == "critical"
        assert (await again.client.put("/v1/agent/check/pass/service:o1")).status == 200
        assert "o1" in again.db.load_check_states()
        assert (await again.client.delete("/v1/apps/o1")).status == 200
        assert again.db.load_check_states() == {}
    finally:
        await stop_local(again)


async def test_a_refused_registration_stores_nothing(local: Local, tls: Any, state_dir: Path):
    # Fill the main document to just under the byte cap, then one too many.
    n = 0
    while True:
        status, body = await local.put(f"/v1/apps/big-{n:02d}", big_meta_body())
        if status != 200:
            break
        n += 1
    assert status == 400 and "would exceed 131072 bytes" in body["error"]
    stored = await local.apps()
    writes = local.db.get_counter("registration_writes")
    # The same through the Consul path.
    consul = {"ID": "big-c", "Name": "orders", "Port": 1, "Meta": big_meta_body()["meta"]}
    status, text = await local.put("/v1/agent/service/register", consul)
    assert status == 400 and "would exceed" in text
    assert local.db.get_counter("registration_writes") == writes
    assert await local.apps() == stored
    # Replacing one with a smaller record is fine; a local-only one has its own room.
    assert (await local.put("/v1/apps/big-00", APP))[0] == 200
    assert (await local.put("/v1/apps/big-local", big_meta_body(export=[])))[0] == 200
    await stop_local(local)
    again = await start_local(tls, state_dir)
    try:
        assert len(await again.apps()) == n + 1
    finally:
        await stop_local(again)


@pytest.mark.slow
async def test_stored_registrations_that_cannot_all_be_published_do_not_brick_the_agent(
    tls: Any, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # As an older build left it: more rows than one node may publish, a few
    # too big together, and one that is not a registration at all.
    with StateDB.open(state_dir / DB_FILE) as db:
        for n in range(MAX_APPS_PER_ORIGIN + 2):
            db.put_registration(Registration(record(f"i{n:03d}")), 1)
    raw = sqlite3.connect(state_dir / DB_FILE)
    with raw:
        raw.execute("INSERT INTO registrations VALUES ('garbled', '{not json', NULL, 0)")
    raw.close()
    with caplog.at_level(logging.INFO):
        node = await start_local(tls, state_dir)
    try:
        apps = await node.apps()
        assert len(apps) == MAX_APPS_PER_ORIGIN
        # The oldest writes are kept; the two newest are dropped, each said once.
        assert {"i512", "i513"}.isdisjoint(a["instance"] for a in apps)
        dropped = [m for m in _messages(caplog) if "not publishing stored registration" in m]
        assert len(dropped) == 2 and all("the most one node may publish" in m for m in dropped)
        assert any("skipping stored registration 'garbled'" in m for m in _messages(caplog))
        # And it serves: deregister one, register another.
        assert (await node.client.delete("/v1/apps/i000")).status == 200
        assert (await node.put("/v1/apps/fresh", APP))[0] == 200
        assert (await node.put("/v1/apps/fresh-2", APP))[0] == 400
    finally:
        await stop_local(node)
    with StateDB.open(state_dir / DB_FILE) as db:
        assert len(db.load_registrations()) == MAX_APPS_PER_ORIGIN


# ---------------------------------------------------------------------------
# Real agents


@pytest.fixture
def agents() -> Iterator[list[AgentProc]]:
    started: list[AgentProc] = []
    yield started
    for a in started:
        a.stop()


@pytest.mark.e2e
def test_the_513th_registration_is_refused_and_a_restart_has_512(tmp_path, certs, agents):
    a = AgentProc(tmp_path, certs, "n1").start()
    agents.append(a)
    for n in range(MAX_APPS_PER_ORIGIN):
        a.register("orders", f"o{n:03d}", 3500)
    status, body, _ = a.call("PUT", "/v1/apps/o512", {**APP, "port": 3512})
    assert status == 400
    assert body == {
        "error": "this node already publishes 512 app records, the most one node may publish"
    }
    # Replacing one is no new record: still allowed.
    a.register("orders", "o000", 3600)
    a.signal(signal.SIGTERM)
    assert a.wait() == 0
    a.start()
    apps = a.get("/v1/apps")
    assert len(apps) == MAX_APPS_PER_ORIGIN and "o512" not in {x["instance"] for x in apps}
    assert not any("Traceback" in ln for ln in a.lines)
    # Nothing of the refused one was stored: the restart had nothing to drop.
    assert not any("not publishing stored registration" in ln for ln in a.lines)
    assert a.call("DELETE", "/v1/apps/o001")[0] == 200
    a.register("orders", "o512", 3512)
    assert len(a.get("/v1/apps")) == MAX_APPS_PER_ORIGIN


@pytest.mark.e2e
def test_a_registration_past_the_byte_cap_is_refused_and_a_restart_is_fine(tmp_path, certs, agents):
    a = AgentProc(tmp_path, certs, "n1").start()
    agents.append(a)
    n = 0
    while True:
        status, body, _ = a.call("PUT", f"/v1/apps/big-{n:02d}", big_meta_body(3500 + n))
        if status != 200:
            break
        n += 1
    assert status == 400
    assert body["error"] == (
        "the node's document for every cluster would exceed 131072 bytes, the most a signed "
        "document may hold; use less meta or fewer instances"
    )
    a.kill()
    a.start()
    instances = sorted(x["instance"] for x in a.get("/v1/apps"))
    assert instances == [f"big-{i:02d}" for i in range(n)]
    assert not any("not publishing stored registration" in ln for ln in a.lines)
    assert a.call("DELETE", "/v1/apps/big-00")[0] == 200
    assert a.call("PUT", f"/v1/apps/big-{n:02d}", big_meta_body())[0] == 200


@pytest.mark.e2e
def test_every_field_and_the_export_scope_come_back_after_sigkill(tmp_path, certs, agents):
    a = AgentProc(tmp_path, certs, "n1").start()
    agents.append(a)
    a.register(
        "web", "web-1", 8080, export=[], meta={"team": "a", "ünï": "çødé"}, weight=5,
        protocol="grpc", namespace="shop", check={"ttl": "30s"},
    )  # fmt: skip
    a.register(
        "api", "api-1", 8081, export=["west"], check={"tcp": "127.0.0.1:1", "interval": "1m"}
    )
    a.register("all", "all-1", 8082, meta={"k": "v"}, weight=0)
    before = a.get("/v1/apps")
    assert {x["instance"]: x.get("export") for x in before} == {
        "web-1": [],
        "api-1": ["west"],
        "all-1": None,
    }

    def scopes() -> dict[str, str]:
        return {
            app: doc["scope"]
            for doc in a.get("/v1/records")
            if doc["node"] == "n1"
            for app in doc["apps"]
        }

    assert scopes() == {"web-1": "local", "api-1": "to:west", "all-1": "*"}
    a.kill()  # SIGKILL
    a.start()
    assert a.get("/v1/apps") == before
    assert scopes() == {"web-1": "local", "api-1": "to:west", "all-1": "*"}


@pytest.mark.e2e
def test_maintenance_survives_a_sigkill_and_ends_with_its_registration(tmp_path, certs, agents):
    a = AgentProc(tmp_path, certs, "n1").start()
    agents.append(a)
    a.register("orders", "o1", 3500)  # no check: passing
    a.register("web", "w1", 8080, check={"ttl": "30s"})

    def health() -> dict[str, str]:
        return {x["instance"]: x["health"] for x in a.get("/v1/apps")}

    def maintenance(instance: str, enable: bool) -> None:
        path = f"/v1/agent/service/maintenance/{instance}?enable={str(enable).lower()}"
        assert a.call("PUT", path + "&reason=upgrade")[0] == 200

    a.call("PUT", "/v1/agent/check/pass/service:w1")
    assert health() == {"o1": "passing", "w1": "passing"}
    maintenance("o1", True)
    maintenance("w1", True)
    assert health() == {"o1": "critical", "w1": "critical"}
    a.kill()  # SIGKILL: the acknowledged maintenance is on disk
    a.start()
    assert health() == {"o1": "critical", "w1": "critical"}
    assert a.call("PUT", "/v1/agent/check/pass/service:w1")[0] == 200  # does not end it
    assert health()["w1"] == "critical"
    checks = a.get("/v1/agent/checks")
    assert checks["service:w1"]["Output"] == "maintenance mode: upgrade"
    # Taken out: the registration's health, or what the check reports.
    maintenance("o1", False)
    maintenance("w1", False)
    assert health() == {"o1": "passing", "w1": "passing"}
    a.kill()
    a.start()
    assert health()["o1"] == "passing"  # taken out is stored too
    # A deregistration ends it: the instance registered again is served.
    maintenance("o1", True)
    assert a.call("DELETE", "/v1/apps/o1")[0] == 200
    a.register("orders", "o1", 3500)
    a.kill()
    a.start()
    assert health()["o1"] == "passing"


@pytest.mark.e2e
def test_an_unchecked_instances_reported_health_survives_a_sigkill(tmp_path, certs, agents):
    a = AgentProc(tmp_path, certs, "n1").start()
    agents.append(a)
    a.register("orders", "o1", 3500)  # no check: passing

    def health() -> str:
        (app,) = a.get("/v1/apps")
        return str(app["health"])

    assert a.call("PUT", "/v1/apps/o1/health", {"status": "critical"})[0] == 200
    a.kill()  # SIGKILL: the acknowledged report is on disk
    a.start()
    assert health() == "critical"
    assert a.resolve("orders") == []  # not routed to
    # Reported during maintenance: what taking it out restores.
    maintenance = "/v1/agent/service/maintenance/o1?enable="
    assert a.call("PUT", maintenance + "true")[0] == 200
    assert a.call("PUT", "/v1/apps/o1/health", {"status": "warning"})[0] == 200
    assert health() == "critical"
    assert a.call("PUT", maintenance + "false")[0] == 200
    assert health() == "warning"
    a.kill()
    a.start()
    assert health() == "warning"


@pytest.mark.e2e
def test_a_ttl_checked_instance_is_still_served_after_a_sigkill(tmp_path, certs, agents):
    """The Consul TTL pattern: the app reports every few seconds; the agent
    crashes and comes back within the TTL; the app is served throughout what
    is left of its last report, as Consul would keep it."""
    a = AgentProc(tmp_path, certs, "n1").start()
    agents.append(a)
    a.register("web", "w1", 8080, check={"ttl": "60s"})
    assert a.resolve("web") == []  # not before it reports
    assert a.call("PUT", "/v1/agent/check/pass/service:w1?note=ok")[0] == 200
    assert [e["instance"] for e in a.resolve("web")] == ["w1"]
    a.kill()
    a.start()
    assert [e["instance"] for e in a.resolve("web")] == ["w1"]
    checks = a.get("/v1/agent/checks")
    assert (checks["service:w1"]["Status"], checks["service:w1"]["Output"]) == ("passing", "ok")
    # What it said last, also when that was bad.
    assert a.call("PUT", "/v1/agent/check/fail/service:w1?note=db+down")[0] == 200
    a.kill()
    a.start()
    assert a.resolve("web") == []
    assert a.get("/v1/agent/checks")["service:w1"]["Output"] == "db down"


@pytest.mark.e2e
def test_a_fresh_state_directory_is_0700_and_its_files_0600(tmp_path, certs, agents):
    a = AgentProc(tmp_path, certs, "n1")
    old = os.umask(0)  # the agent inherits it: modes must not depend on it
    try:
        a.start()
    finally:
        os.umask(old)
    agents.append(a)
    a.register("orders", "o1", 3500)
    assert _mode(a.state_dir) == 0o700
    for name in (DB_FILE, "meshd.db-wal", "meshd.db-shm", MARKER_FILE, "meshd.lock"):
        assert _mode(a.state_dir / name) == 0o600, name


def _versions(a: AgentProc) -> int:
    return max(doc["version"] for doc in a.get("/v1/records") if doc["node"] == a.node)


def _incarnation(a: AgentProc) -> int:
    return next(m["incarnation"] for m in a.get("/v1/members") if m["node"] == a.node)


@pytest.mark.e2e
def test_a_deleted_wal_or_an_emptied_database_is_noticed_and_versions_only_grow(
    tmp_path, certs, agents
):
    a = AgentProc(tmp_path, certs, "n1").start()
    agents.append(a)
    for n in range(3):
        a.register("orders", f"o{n}", 3500 + n)
    highest = _versions(a)
    a.kill()
    (a.state_dir / "meshd.db-wal").unlink()
    (a.state_dir / "meshd.db-shm").unlink()
    a.start()
    wait_until(lambda: any("-wal file was missing" in ln for ln in a.lines), 5, "WAL warning")
    assert len(a.get("/v1/apps")) == 3  # checkpointed after every registration
    assert a.register("orders", "o3", 3503) > highest
    highest, incarnation = _versions(a), _incarnation(a)

    a.kill()
    os.truncate(a.state_dir / DB_FILE, 0)
    for suffix in ("-wal", "-shm"):
        (a.state_dir / (DB_FILE + suffix)).unlink(missing_ok=True)
    a.start()
    line = (
        f"state database {a.state_dir / DB_FILE} was emptied or replaced; it held 4 registrations"
    )
    wait_until(lambda: any(line in ln for ln in a.lines), 5, "emptied warning")
    assert a.get("/v1/apps") == []
    # The empty document and everything after it outrank the lost ones.
    assert _versions(a) > highest
    assert a.register("orders", "o9", 3509) > highest
    assert _incarnation(a) > incarnation


def _can_mount() -> str | None:
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    return None


def _fill(path: Path) -> None:
    """Write ``path`` until the file system has no room left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        chunk = b"\0" * 4096
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, chunk)
        with contextlib.suppress(OSError):
            while True:  # the last partial page too
                os.write(fd, b"\0")
    finally:
        os.close(fd)


@pytest.mark.e2e
def test_a_really_full_disk_on_a_tmpfs(tmp_path, certs, agents):
    why = _can_mount()
    if why:
        pytest.skip(why)
    mnt = tmp_path / "state"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        a = AgentProc(tmp_path, certs, "n1").start()
        agents.append(a)
        a.register("orders", "o1", 3500, meta={"k": "v"})
        ballast = mnt / "ballast"
        _fill(ballast)
        # SQLite reuses the room its files already have, so a few writes may
        # still get through; each is acknowledged only if stored.
        acknowledged = {"o1"}
        for n in range(2, 40):
            status, body, _ = a.call("PUT", f"/v1/apps/o{n}", big_meta_body(3500 + n))
            if status != 200:
                break
            acknowledged.add(f"o{n}")
        assert status == 507, body
        assert "is full" in body["error"] and body["error"].endswith("nothing was stored")
        status, health, _ = a.call("GET", "/v1/health")
        assert status == 503 and health["status"] == "degraded" and "full" in health["reason"]
        assert a.metric("meshd_storage_errors_total", cause="full") >= 1
        # Still serving, and nothing half-written.
        assert {x["instance"] for x in a.get("/v1/apps")} == acknowledged
        # Room again: the next write goes through and health recovers.
        ballast.unlink()
        a.register("orders", "after", 3599)
        acknowledged.add("after")
        assert a.call("GET", "/v1/health")[0] == 200
        a.kill()
        # Full again at start: the agent starts (degraded) if it can still
        # reserve its versions, else exits 2 with one line; never a traceback.
        _fill(ballast)
        try:
            a.start(timeout=20)
            assert a.call("GET", "/v1/health")[0] in (200, 503)
            a.kill()
        except AssertionError:
            assert a.wait() == 2
            errors = [ln for ln in a.lines if ln.startswith("meshd: error:")]
            assert len(errors) == 1 and "full" in errors[0], a.lines
        assert not any("Traceback" in ln for ln in a.lines), a.lines
        ballast.unlink()
        a.start()
        assert {x["instance"] for x in a.get("/v1/apps")} == acknowledged
        a.stop()
    finally:
        for a in agents:
            a.stop()
        subprocess.run(["umount", str(mnt)], check=False, timeout=30)
