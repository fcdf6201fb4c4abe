"""The asyncio driver of the protocol core: one agent on one node.

It owns what the core must not: the clock (``loop.time()``), the sockets
(``Transport``), the durable state (``StateDB``) and the health checks.  After
every call into the core it *pumps*: sends what the core queued, handles the
core's events, persists a changed incarnation and re-arms one timer at the
core's next deadline.  There is no poll loop.

Durability: a registration is committed to SQLite before the core publishes
it, so an acknowledged registration survives a crash.  Origin versions must
never repeat across restarts (a repeat with other content would be two truths
at one version), so the agent reserves versions in blocks: it persists a
ceiling before publishing past it, and a restart starts above the ceiling.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from dataclasses import replace

from meshd.agent.checks import CheckRunner
from meshd.agent.interface import (
    ClusterInfo,
    Endpoint,
    MemberInfo,
    Registration,
)
from meshd.agent.statedb import StateDB
from meshd.agent.transport import Transport
from meshd.identity import NodeCert, StateSigner, StateVerifier
from meshd.metrics import Metrics
from meshd.policy.locality import TIER_RANK, Topology, tier_of
from meshd.protocol.config import Config
from meshd.protocol.events import MemberChanged, OriginChanged
from meshd.protocol.node import Node
from meshd.wire import Message, Status

log = logging.getLogger("meshd.agent")

#: Versions reserved per SQLite write (see module doc).  Large enough that a
#: flapping health check does not fsync on every flip.
VERSION_BLOCK = 1000
#: Seconds between writes of the last known peers (for rejoin without --join).
PEER_SAVE_INTERVAL = 2.0
#: Seconds a graceful leave waits for its notice to be written out.
LEAVE_FLUSH_TIMEOUT = 2.0


class Agent:
    """Implements :class:`meshd.agent.interface.AgentAPI` over a running core."""

    def __init__(
        self,
        *,
        node_cert: NodeCert,
        verifier: StateVerifier,
        transport: Transport,
        metrics: Metrics,
        protocol: Config,
        region: str,
        zone: str,
        advertise: str,
    ) -> None:
        self.node_name = node_cert.node
        self.cluster = node_cert.cluster
        self.region = region
        self.zone = zone
        self.metrics = metrics
        self.topology = Topology(self.node_name, self.cluster, region, zone)
        self._cert = node_cert
        self._verifier = verifier
        self._transport = transport
        self._db: StateDB = None  # type: ignore[assignment]  # see attach_statedb
        self._protocol = protocol
        self._advertise = advertise
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._checks: dict[str, Registration] = {}
        self._persisted_incarnation = 0
        self._version_ceiling = 0
        self._peers_changed = asyncio.Event()
        self._peer_task: asyncio.Task[None] | None = None
        self.core: Node | None = None
        self._reported: Counter[str] = Counter()  # core counters already exported
        self.runner = CheckRunner(self._on_check_status)
        transport.on_message = self._on_message
        transport.on_refused = self._on_refused

    # ------------------------------------------------------------------
    # Life cycle

    def attach_statedb(self, statedb: StateDB) -> None:
        """Hand over the durable state (opened last, after the listeners bound)."""
        self._db = statedb

    def start(self, join: list[str]) -> None:
        """Build the core from the durable state and contact peers."""
        regs = self._db.load_registrations()
        incarnation = self._db.get_counter("incarnation")
        version = self._db.get_counter("version")
        self._version_ceiling = version + VERSION_BLOCK
        # The core moves past both counters by one; persist before it speaks.
        self._persisted_incarnation = incarnation + 1
        self._db.set_counters(incarnation=incarnation + 1, version=self._version_ceiling)
        apps = []
        for reg in regs:
            # A checked instance is not routed to until its check passes again
            # (as Consul does after a restart): the app may have died with us.
            record = reg.record if reg.check is None else replace(reg.record, health="critical")
            apps.append(record)
            self._checks[reg.record.instance] = reg
        self.core = Node(
            config=self._protocol,
            node=self.node_name,
            cluster=self.cluster,
            region=self.region,
            zone=self.zone,
            address=self._advertise,
            signer=StateSigner(self._cert),
            verifier=self._verifier,
            rng=random.Random(),
            now=self._loop.time(),
            incarnation=incarnation,
            version=version,
            apps=apps,
        )
        for reg in regs:
            if reg.check is not None:
                self.runner.start(reg.record.instance, reg.check, initial="critical")
        seeds = join or self._db.load_peers()
        if seeds:
            self.core.join(seeds, self._loop.time())
        self._pump()
        self._peer_task = self._loop.create_task(self._save_peers_loop())

    async def stop(self, leave: bool = True) -> None:
        """Graceful leave (when asked), then close everything we opened."""
        if self._timer is not None:
            self._timer.cancel()
        if self.core is not None and leave:
            self.core.leave(self._loop.time())
            self._pump(rearm=False)
            await self._transport.flush(LEAVE_FLUSH_TIMEOUT)
        if self._peer_task is not None:
            self._peer_task.cancel()
        await self.runner.stop_all()
        self._save_peers()
        await self._transport.close()

    # ------------------------------------------------------------------
    # Pumping the core

    @property
    def _core(self) -> Node:
        assert self.core is not None, "agent not started"
        return self.core

    def _on_message(self, peer: str, msg: Message) -> None:
        core = self._core
        core.receive(msg, self._loop.time(), peer=peer)
        self._pump()

    def _on_refused(self, address: str) -> None:
        self._core.report_refused(address, self._loop.time())
        self._pump()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._core.handle_timer(self._loop.time())
        self._pump()

    def _pump(self, rearm: bool = True) -> None:
        core = self._core
        for address, msg in core.messages_to_send():
            self._transport.send(address, msg)
        changed = False
        event = core.next_event()
        while event is not None:
            if isinstance(event, MemberChanged):
                self._peers_changed.set()
                if event.status in (Status.DEAD, Status.LEFT, Status.ALIVE):
                    changed = True
                log.info("member %s is %s", event.node, event.status.label)
            elif isinstance(event, OriginChanged):
                changed = True
            event = core.next_event()
        if core.incarnation != self._persisted_incarnation:
            self._db.set_counters(incarnation=core.incarnation)
            self._persisted_incarnation = core.incarnation
        for reason, count in core.counters.items():
            if reason.startswith("rejected-state:") or reason == "impersonation":
                delta = count - self._reported.get(reason, 0)
                if delta:
                    self.metrics.rejected.labels(reason.removeprefix("rejected-state:")).inc(delta)
                    self._reported[reason] = count
        if changed:
            self.update_gauges()
            self._changed.set()
            self._changed = asyncio.Event()
        if rearm:
            at = core.get_timer()
            if self._timer_at is None or at < self._timer_at - 1e-4 or at > self._timer_at:
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = self._loop.call_at(max(at, self._loop.time()), self._on_timer)
                self._timer_at = at

    def _reserve_version(self, upcoming: int) -> None:
        """Persist a new ceiling before the core publishes past the old one."""
        if upcoming >= self._version_ceiling:
            self._version_ceiling = upcoming + VERSION_BLOCK
            self._db.set_counters(version=self._version_ceiling)

    async def _save_peers_loop(self) -> None:
        # Save at once after a change (a crash right after joining must still
        # find its peers on restart), then at most once per interval.
        while True:
            await self._peers_changed.wait()
            self._peers_changed.clear()
            self._save_peers()
            await asyncio.sleep(PEER_SAVE_INTERVAL)

    def _save_peers(self) -> None:
        if self.core is None:
            return
        peers = [
            (m.address, m.node)
            for m in self.core.member_list()
            if m.node != self.core.id and m.serving
        ]
        if peers:
            self._db.save_peers(peers)

    # ------------------------------------------------------------------
    # AgentAPI

    @property
    def index(self) -> int:
        return self._core.store.index

    async def register(self, reg: Registration) -> int:
        async with self._lock:
            core = self._core
            record = reg.record
            if reg.check is not None and reg.check.kind == "ttl":
                # As Consul: a TTL-checked app is not routed to before it reports.
                old = self._checks.get(record.instance)
                same_check = old is not None and old.check == reg.check
                status = self.runner.status(record.instance) if same_check else None
                record = replace(record, health=status or "critical")
            elif reg.check is not None:
                record = replace(record, health="critical")
            upcoming = core.version + 1
            self._reserve_version(upcoming)
            await asyncio.to_thread(self._db.put_registration, reg, self._version_ceiling)
            version = core.set_app(record, self._loop.time())
            old = self._checks.get(record.instance)
            self._checks[record.instance] = reg
            if old is None or old.check != reg.check:
                self.runner.stop(record.instance)
                if reg.check is not None:
                    self.runner.start(record.instance, reg.check, initial=record.health)
            self._pump()
            return version

    async def deregister(self, instance: str) -> bool:
        async with self._lock:
            core = self._core
            if instance not in core.apps:
                return False
            self._reserve_version(core.version + 1)
            await asyncio.to_thread(self._db.delete_registration, instance, self._version_ceiling)
            core.remove_app(instance, self._loop.time())
            self._checks.pop(instance, None)
            self.runner.stop(instance)
            self._pump()
            return True

    async def set_health(self, instance: str, status: str) -> bool:
        if instance not in self._core.apps:
            return False
        reg = self._checks.get(instance)
        if reg is not None and reg.check is not None and reg.check.kind == "ttl":
            self.runner.report_ttl(instance, status)
        self._set_health(instance, status)
        return True

    def _on_check_status(self, instance: str, status: str) -> None:
        if self.core is not None and instance in self.core.apps:
            self._set_health(instance, status)

    def _set_health(self, instance: str, status: str) -> None:
        core = self._core
        record = core.apps.get(instance)
        if record is None or record.health == status:
            return
        self._reserve_version(core.version + 1)
        core.set_app(replace(record, health=status), self._loop.time())
        log.info("instance %s is %s", instance, status)
        self._pump()

    def local_registrations(self) -> list[Registration]:
        core = self._core
        out = []
        for instance, record in sorted(core.apps.items()):
            reg = self._checks.get(instance)
            out.append(Registration(record, reg.check if reg is not None else None))
        return out

    def resolve(
        self, app: str, namespace: str, policy: str | None, include_unhealthy: bool
    ) -> tuple[int, list[Endpoint]]:
        if policy not in (None, "", "default"):
            raise KeyError(policy)
        core = self._core
        index = core.store.index
        rows = []
        for state, rec in core.store.endpoints(app, namespace):
            if not include_unhealthy and rec.health == "critical":
                continue
            where = Topology(state.node, state.cluster, state.region, state.zone)
            tier = tier_of(self.topology, where)
            rows.append(
                Endpoint(
                    app=rec.app,
                    namespace=rec.namespace,
                    instance=rec.instance,
                    address=rec.address,
                    port=rec.port,
                    protocol=rec.protocol,
                    node=state.node,
                    cluster=state.cluster,
                    region=state.region,
                    zone=state.zone,
                    health=rec.health,
                    weight=rec.weight,
                    meta=dict(rec.meta),
                    tier=tier,
                )
            )
        health_rank = {"passing": 0, "warning": 1, "critical": 2}
        rows.sort(
            key=lambda e: (
                health_rank[e.health],
                TIER_RANK[e.tier],
                -e.weight,
                e.cluster,
                e.node,
                e.instance,
            )
        )
        return index, rows

    async def wait_for_index(self, index: int, timeout: float) -> int:
        deadline = self._loop.time() + timeout
        while self.index <= index:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                break
        return self.index

    def members(self, cluster: str | None = None) -> list[MemberInfo]:
        out = []
        for m in self._core.member_list():
            if cluster and m.cluster != cluster:
                continue
            out.append(
                MemberInfo(
                    node=m.name,
                    cluster=m.cluster,
                    region=m.region,
                    zone=m.zone,
                    address=m.address,
                    status=m.status.label,  # type: ignore[arg-type]
                    incarnation=m.incarnation,
                )
            )
        return out

    def clusters(self) -> list[ClusterInfo]:
        by: dict[str, list[int]] = {}
        for m in self._core.member_list():
            row = by.setdefault(m.cluster, [0, 0])
            if m.serving:
                row[0] += 1
        return [
            ClusterInfo(cluster=c, reachable=alive > 0, nodes=alive, bridges=bridges)
            for c, (alive, bridges) in sorted(by.items())
        ]

    def update_gauges(self) -> None:
        """Refresh the member and record gauges after a change."""
        core = self._core
        counts = Counter(m.status.label for m in core.members.values())
        for status in ("alive", "suspect", "dead", "left"):
            self.metrics.members.labels(status).set(counts.get(status, 0))
        served = tombstoned = 0
        for origin in core.store.digest():
            entry = core.store.get(origin)
            if entry is None:
                continue
            if entry.tombstone_since is None:
                served += len(entry.state.apps)
            else:
                tombstoned += len(entry.state.apps)
        self.metrics.records.labels("served").set(served)
        self.metrics.records.labels("tombstoned").set(tombstoned)
