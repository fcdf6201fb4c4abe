"""The one in-memory agent the HTTP-layer tests run ``meshd.api`` against.

``FakeAgent`` implements :class:`meshd.agent.interface.AgentAPI` and nothing
more, so the API tests pin the HTTP contract (paths, JSON shapes, status
codes, error sentences) independently of the real agent.  ``tests/conftest.py``
hands one out as the ``agent`` fixture; a file that needs something special
configures its instance (the knobs below) or subclasses it there.

It lives in a module of its own rather than in ``conftest.py`` because test
files import it (type hints, fresh instances inside Hypothesis examples), and
pytest imports ``conftest.py`` under a name a test file cannot import again
without getting a second, different class.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509

from meshd.agent.interface import (
    CheckSpec,
    ClusterInfo,
    Endpoint,
    MemberInfo,
    Registration,
)
from meshd.metrics import Metrics
from meshd.policy.policy import parse_policy, policy_to_dict
from meshd.protocol.vivaldi import Coordinate
from meshd.revocation import RevocationList, accept
from meshd.wire import AppRecord

if TYPE_CHECKING:
    from meshd.agent.interface import AgentAPI


class FakeAgent:
    """AgentAPI in memory: registrations, an index with a change event, a log.

    ``registrations`` are the local instances the write routes change;
    ``remote`` holds endpoints of other nodes a test lays out by hand, so
    locality order, standbys and unreachable clusters can be pinned without a
    mesh.  ``resolve`` answers local instances first (tier ``node``), then
    ``remote`` in the order given; usable ones (reachable, not critical) come
    before the rest, which are standbys (``active=False``) listed only when
    unhealthy ones are asked for.

    Every mutating call is logged in ``calls`` before it does anything, so a
    test proves that a refused request never reached the agent.  Every
    ``wait_for_index`` is logged in ``waits`` with the timeout the API chose,
    and ``until_blocked`` returns once a blocking query is parked there: the
    blocking-query tests assert on those, never on elapsed time.
    """

    node_name = "n7"
    cluster = "east"

    def __init__(self, ca_certs: Sequence[x509.Certificate] = ()) -> None:
        self.metrics = Metrics()
        self.registrations: dict[str, Registration] = {}
        self.remote: list[Endpoint] = []
        self.calls: list[str] = []
        self.outputs: dict[str, str] = {}
        self.waits: list[tuple[int, float]] = []  # (index, timeout) of each wait_for_index
        self.blocked = 0  # callers parked in wait_for_index right now
        self.policy: dict[str, Any] = {"failover": []}
        self.member_rows = [
            MemberInfo("n7", "east", "us-east", "us-east-1a", "192.0.2.7:7946", "alive", 3),
            MemberInfo("n8", "east", "us-east", "us-east-1b", "192.0.2.8:7946", "suspect", 1),
            MemberInfo("w1", "west", "us-west", "us-west-2a", "192.0.2.91:7946", "dead", 0),
        ]
        self.cluster_rows = [ClusterInfo("east", True, 2, 1), ClusterInfo("west", False, 1, 0)]
        # Revocations: the CAs a list must be signed by, the list held, and the
        # number of every list that reached put_revocations.
        self.ca_certs: list[x509.Certificate] = list(ca_certs)
        self.held: RevocationList | None = None
        self.puts: list[int] = []
        # Knobs for the failure paths.
        self.storage_error: str | None = None  # a sentence: /v1/health is degraded
        self.refuse: str | None = None  # register raises ValueError(refuse)
        self.explode = False  # members() and resolve() raise: the 500 paths
        self._index = 1
        self._changed = asyncio.Event()
        self._entered = asyncio.Event()

    # -- the index -----------------------------------------------------------

    @property
    def index(self) -> int:
        return self._index

    @property
    def generation(self) -> int:
        return self._index

    def bump(self) -> None:
        """Raise the index and wake every waiter (a fresh event for the next change)."""
        self._index += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for_index(self, index: int, timeout: float) -> int:
        self.waits.append((index, timeout))
        self.blocked += 1
        self._entered.set()
        try:
            async with asyncio.timeout(timeout):
                while self._index <= index:
                    await self._changed.wait()
        except TimeoutError:
            pass
        finally:
            self.blocked -= 1
        return self._index

    async def until_blocked(self, count: int = 1, timeout: float = 10.0) -> None:
        """Return once ``count`` callers are parked in wait_for_index; fail after ``timeout``."""
        async with asyncio.timeout(timeout):
            while self.blocked < count:
                self._entered.clear()
                await self._entered.wait()

    # -- local registrations -------------------------------------------------

    def seed(self, instance: str = "web-1", health: str = "passing") -> None:
        """A registration of app ``web`` with a TTL check, put in place without a call."""
        record = AppRecord(app="web", instance=instance, address="192.0.2.3", port=80)
        check = CheckSpec(kind="ttl", ttl=10.0)
        self.registrations[instance] = Registration(replace(record, health=health), check)

    async def register(self, reg: Registration) -> int:
        self.calls.append(f"register {reg.record.instance}")
        if self.refuse is not None:
            raise ValueError(self.refuse)
        self.registrations[reg.record.instance] = reg
        self.bump()
        return self._index

    async def deregister(self, instance: str) -> bool:
        self.calls.append(f"deregister {instance}")
        if self.registrations.pop(instance, None) is None:
            return False
        self.bump()
        return True

    def check_outputs(self) -> dict[str, str]:
        return dict(self.outputs)

    async def set_maintenance(self, instance: str, enable: bool, reason: str) -> bool:
        if instance not in self.registrations:
            return False
        self.calls.append(f"maintenance {instance} {enable} {reason}")
        return await self.set_health(instance, "critical" if enable else "passing")

    def coordinates(self) -> list[tuple[str, str, Coordinate]]:
        return [(self.node_name, self.cluster, Coordinate((0.001, 0.0), 0.5, 0.0001))]

    async def set_health(self, instance: str, status: str, output: str = "") -> bool:
        if output:
            self.outputs[instance] = output
        self.calls.append(f"health {instance} {status}")
        reg = self.registrations.get(instance)
        if reg is None:
            return False
        self.registrations[instance] = replace(reg, record=replace(reg.record, health=status))
        self.bump()
        return True

    def local_registrations(self) -> list[Registration]:
        return list(self.registrations.values())

    # -- lookups ---------------------------------------------------------------

    def _local_endpoints(self) -> list[Endpoint]:
        return [
            Endpoint(
                app=r.app,
                namespace=r.namespace,
                instance=r.instance,
                address=r.address,
                port=r.port,
                protocol=r.protocol,
                node=self.node_name,
                cluster=self.cluster,
                region="us-east",
                zone="us-east-1a",
                health=r.health,
                weight=r.weight,
                meta=dict(r.meta),
                tier="node",
            )
            for r in (reg.record for reg in self.registrations.values())
        ]

    def resolve(
        self, app: str, namespace: str, policy: str | None, include_unhealthy: bool
    ) -> tuple[int, list[Endpoint]]:
        if self.explode:
            raise RuntimeError("boom")
        if policy not in (None, "default"):
            raise KeyError(policy)
        rows = [
            e
            for e in self._local_endpoints() + self.remote
            if e.app == app and e.namespace == namespace
        ]

        def usable(e: Endpoint) -> bool:
            return e.reachable and e.health != "critical"

        healthy = [e for e in rows if usable(e)]
        standby = [replace(e, active=False) for e in rows if not usable(e)]
        return self._index, healthy + (standby if include_unhealthy else [])

    def inventory(self, app: str, namespace: str) -> tuple[int, list[Endpoint]]:
        """Every row of the app, in the order given (local first), with its health."""
        if self.explode:
            raise RuntimeError("boom")
        rows = [
            e
            for e in self._local_endpoints() + self.remote
            if e.app == app and e.namespace == namespace
        ]
        return self._index, rows

    def app_names(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for e in self._local_endpoints() + self.remote:
            out.setdefault(e.namespace, set()).add(e.app)
        return out

    def members(self, cluster: str | None = None) -> list[MemberInfo]:
        if self.explode:
            raise RuntimeError("boom")
        return [m for m in self.member_rows if cluster is None or m.cluster == cluster]

    def clusters(self) -> list[ClusterInfo]:
        return list(self.cluster_rows)

    def records(self) -> list[dict[str, Any]]:
        return [{"origin": "east/n7", "version": 3, "apps": sorted(self.registrations)}]

    # -- policy ----------------------------------------------------------------

    def policy_json(self) -> dict[str, Any]:
        return dict(self.policy)

    def put_policy(self, data: dict[str, Any]) -> dict[str, Any]:
        self.calls.append("policy")
        self.policy = policy_to_dict(parse_policy(data, source="PUT /v1/policy"))
        return self.policy_json()

    # -- revocations -----------------------------------------------------------

    def revocations(self) -> RevocationList | None:
        return self.held

    async def put_revocations(self, rl: RevocationList) -> RevocationList:
        # The real agent's rule (meshd.revocation.accept), so a stale list is a 409.
        self.calls.append(f"revocations {rl.number}")
        self.puts.append(rl.number)
        if accept(self.held, rl):
            self.held = rl
        assert self.held is not None
        return self.held


if TYPE_CHECKING:
    # The type checker holds the fake to the interface it stands in for.
    _conforms: AgentAPI = FakeAgent()


def write_node_pki(root: Path, trust: str, nodes: Sequence[str]) -> dict[str, tuple[str, str, str]]:
    """A CA under ``root`` and a certificate of cluster east for each node, on 127.0.0.1:
    node -> (ca, cert, key) file names, as the transport's contexts take them."""
    from meshd import identity

    ca = identity.create_ca(trust)
    ca_pem, _ = identity.write_ca(ca, root / "ca")
    files = {}
    for node in nodes:
        cert, key = identity.write_node_cert(
            identity.issue_node_cert(ca, node=node, cluster="east", ips=["127.0.0.1"]),
            root / node,
        )
        files[node] = (str(ca_pem), str(cert), str(key))
    return files


async def until(pred: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """Poll ``pred`` until truthy; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)
