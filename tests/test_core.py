"""Tests for meshd.protocol.core: the sans-IO SWIM + Lifeguard core, driven by hand.

Most tests build two to six ``Core``s with real identities and shuttle their
messages through ``Net``, a zero-latency in-memory network defined here: it
fires timers in time order, delivers every message at once (unless ``drop``
says otherwise) and logs everything sent.  ``Net`` drives bare cores, the
unit under test, and wires no host: anything with a bridge or a lookup goes
through ``meshd.testing.Cluster``, which pumps the same ``Host`` the agent
pumps.  Only the determinism test uses the full ``Cluster``.
"""

from __future__ import annotations

import random
from dataclasses import replace
from functools import cache

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from meshd.identity import StateSigner, StateVerifier, create_ca, issue_node_cert
from meshd.protocol.awareness import Awareness
from meshd.protocol.config import Config
from meshd.protocol.core import Core
from meshd.protocol.events import MemberChanged, OriginChanged
from meshd.protocol.prober import nack_timeout
from meshd.protocol.store import Entry
from meshd.protocol.suspicion import suspicion_timeout
from meshd.testing import Cluster
from meshd.wire import (
    Ack,
    AppRecord,
    Gossip,
    IndirectPing,
    MemberClaim,
    MemberUpdate,
    Nack,
    OriginState,
    Ping,
    PushPull,
    PushPullReply,
    SignedState,
    Status,
)

CA = create_ca("mesh.local")
VERIFIER = StateVerifier(CA.cert, CA.trust_domain)
LAN = Config.lan()


@cache
def signer(name: str, cluster: str = "east") -> StateSigner:
    return StateSigner(issue_node_cert(CA, name, cluster))


def address(i: int) -> str:
    return f"127.0.0.1:{20000 + i}"


def make_node(
    i: int,
    *,
    config: Config = LAN,
    now: float = 0.0,
    seed: int | None = None,
    incarnation: int = 0,
    version: int = 0,
    apps=(),
) -> Core:
    name = f"n{i}"
    return Core(
        config=config,
        node=name,
        cluster="east",
        address=address(i),
        signer=signer(name),
        verifier=VERIFIER,
        rng=random.Random(i if seed is None else seed * 1000 + i),
        now=now,
        region="r1",
        zone="z1",
        incarnation=incarnation,
        version=version,
        apps=apps,
    )


def claim(status: Status, about: Core, by: Core | str, incarnation: int | None = None):
    """A member update about ``about`` said by ``by``, at its incarnation unless given.

    Alive and left said by ``about`` itself carry its signed claim (ed25519
    signatures are deterministic: the same one the node makes itself).
    """
    inc = about.incarnation if incarnation is None else incarnation
    by_id = by if isinstance(by, str) else by.id
    signed = None
    if status in (Status.ALIVE, Status.LEFT) and by_id == about.id:
        signed = about._signer.sign_claim(
            MemberClaim(status, about.id, inc, about.address, "r1", "z1")
        )
    return MemberUpdate(status, about.id, inc, about.address, "r1", "z1", by_id, signed)


def gossip(src: Core, dst: Core, now: float, *members: MemberUpdate, states=()) -> None:
    dst.receive(Gossip(src.id, members=members, states=tuple(states)), now, peer=src.id)


def drain_events(node: Core) -> list:
    out = []
    while (e := node.next_event()) is not None:
        out.append(e)
    return out


def held(node: Core, origin: str) -> Entry:
    """The entry ``node`` holds for ``origin``; the test fails when it holds none."""
    entry = node.store.get(origin)
    assert entry is not None, f"{node.id} holds nothing from {origin}"
    return entry


def sent(node: Core, kind: type) -> list:
    return [(addr, m) for addr, m in node.messages_to_send() if isinstance(m, kind)]


def rec(instance: str = "o-1", app: str = "orders") -> AppRecord:
    return AppRecord(app=app, instance=instance, address="127.0.0.1", port=8080)


class Net:
    """Zero-latency network among hand-built nodes (see module doc).

    ``drop(src, dst_address, msg)`` returning True loses a message (it is
    still logged).  ``log`` holds ``(time, src, dst_address, msg)``.
    """

    def __init__(self, *nodes: Core, drop=None) -> None:
        self.nodes = {n.address: n for n in nodes}
        self.drop = drop or (lambda src, dst, msg: False)
        self.log: list[tuple[float, Core, str, object]] = []
        self.now = 0.0

    def flush(self, now: float) -> None:
        """Deliver until no node has anything left to send (bounded)."""
        for _ in range(1000):
            batch = [(n, a, m) for n in self.nodes.values() for a, m in n.messages_to_send()]
            if not batch:
                return
            for src, addr, msg in batch:
                self.log.append((now, src, addr, msg))
                dst = self.nodes.get(addr)
                if dst is not None and not self.drop(src, addr, msg):
                    dst.receive(msg, now, peer=src.id)
        raise AssertionError("network never went quiet")

    def run(self, until: float, active=None, stop=None) -> float:
        """Fire timers of ``active`` nodes (default all) in time order up to ``until``.

        Returns the time reached; stops early once ``stop()`` holds.
        """
        active = list(self.nodes.values()) if active is None else active
        for _ in range(100_000):
            t = min(n.get_timer() for n in active)
            if t > until:
                break
            self.now = max(self.now, t)
            for n in active:
                if n.get_timer() <= self.now:
                    n.handle_timer(self.now)
                    self.flush(self.now)
            if stop is not None and stop():
                return self.now
        else:
            raise AssertionError("timers never passed the deadline")
        self.now = max(self.now, until)
        return self.now

    def sent_by(self, node: Core, kind: type, since: float = float("-inf")) -> list:
        return [
            (t, addr, m)
            for t, src, addr, m in self.log
            if src is node and isinstance(m, kind) and t >= since
        ]


def mesh(*nodes: Core, drop=None, now: float = 0.0) -> Net:
    """Every node joins every other over a perfect network, then installs ``drop``."""
    net = Net(*nodes)
    net.now = now
    for n in nodes:
        n.join([m.address for m in nodes if m is not n], now)
    net.flush(now)
    for n in nodes:
        assert {m.id for m in n.members.values()} == {m.id for m in nodes}
        drain_events(n)
    if drop is not None:
        net.drop = drop
    return net


# ---------------------------------------------------------------------------
# Ping and ack


def test_ping_is_acked_with_its_seq_to_source_addr():
    a, b = make_node(1), make_node(2)
    b.receive(Ping(a.id, seq=42, source_addr="192.0.2.99:7000", target=b.id), 1.0, peer=a.id)
    acks = sent(b, Ack)
    assert len(acks) == 1
    addr, ack = acks[0]
    assert addr == "192.0.2.99:7000"
    assert ack.seq == 42 and ack.source == b.id
    assert b.counters["misdirected"] == 0


def test_ping_naming_another_target_is_ignored_and_counted():
    a, b, c = make_node(1), make_node(2), make_node(3)
    b.receive(Ping(a.id, seq=7, source_addr=a.address, target=c.id), 1.0, peer=a.id)
    assert sent(b, Ack) == []
    assert b.counters["misdirected"] == 1


def test_message_from_a_source_other_than_the_authenticated_peer_is_dropped():
    a, b, c = make_node(1), make_node(2), make_node(3)
    b.receive(Ping(a.id, seq=7, source_addr=a.address, target=b.id), 1.0, peer=c.id)
    gossip_as_a = Gossip(a.id, members=(claim(Status.SUSPECT, c, a),))
    b.receive(gossip_as_a, 1.0, peer=c.id)
    assert b.counters["impersonation"] == 2
    assert b.messages_to_send() == []
    assert a.id not in b.members


# ---------------------------------------------------------------------------
# The probe cycle


def test_probe_pings_once_per_interval_while_acked():
    a, b = make_node(1), make_node(2)
    net = mesh(a, b)
    net.run(3.99, active=[a])
    pings = net.sent_by(a, Ping)
    assert len(pings) >= 3
    t0, addr, ping = pings[0]
    # The first probe falls within one interval of start (random phase).
    assert 0.0 <= t0 < LAN.probe_interval
    assert addr == b.address
    assert ping.target == b.id and ping.source_addr == a.address and ping.suspicion is None
    times = [t for t, _, _ in pings]
    assert [round(y - x, 9) for x, y in zip(times, times[1:], strict=False)] == [1.0] * (
        len(times) - 1
    )
    assert net.sent_by(a, IndirectPing) == []
    assert a.members[b.id].status is Status.ALIVE
    assert a.counters["probe-failures"] == 0


def test_lone_peer_silent_is_suspected_after_one_interval():
    a, b = make_node(1), make_node(2)
    net = mesh(a, b, drop=lambda src, dst, msg: dst == b.address)
    t0 = net.run(5.0, active=[a], stop=lambda: net.sent_by(a, Ping))
    net.run(t0 + LAN.probe_interval - 1e-6, active=[a])
    assert a.members[b.id].status is Status.ALIVE
    assert net.sent_by(a, IndirectPing) == []  # nobody to ask
    net.run(t0 + LAN.probe_interval, active=[a])
    assert a.members[b.id].status is Status.SUSPECT
    # No helper could be asked: the failure itself counts once.
    assert a.awareness.score == 1
    assert a.counters["probe-failures"] >= 1


def _probe_setup(n: int, seed: int = 0, drop=None, suspect_last: bool = False):
    nodes = [make_node(i, seed=seed) for i in range(1, n + 1)]
    net = mesh(*nodes, drop=drop)
    a = nodes[0]
    if suspect_last:  # a suspect is never asked to help
        gossip(nodes[1], a, 0.0, claim(Status.SUSPECT, nodes[-1], nodes[1]))
    t0 = net.run(5.0, active=[a], stop=lambda: net.sent_by(a, Ping))
    (_, target_addr, ping) = net.sent_by(a, Ping)[0]
    target = net.nodes[target_addr]
    return net, nodes, a, target, ping, t0


@pytest.mark.parametrize("seed", range(6))
def test_missed_ack_asks_exactly_k_helpers_never_target_nor_self(seed):
    drop_pings = lambda src, dst, msg: isinstance(msg, Ping)  # noqa: E731
    net, nodes, a, target, ping, t0 = _probe_setup(6, seed, drop=drop_pings, suspect_last=True)
    net.run(t0 + LAN.probe_timeout - 1e-6, active=[a])
    assert net.sent_by(a, IndirectPing) == []
    net.run(t0 + LAN.probe_timeout, active=[a])
    asks = net.sent_by(a, IndirectPing)
    assert len(asks) == LAN.indirect_checks
    helpers = [addr for _, addr, _ in asks]
    assert len(set(helpers)) == LAN.indirect_checks
    assert target.address not in helpers and a.address not in helpers
    assert nodes[-1].address not in helpers
    for t, _, msg in asks:
        assert t == t0 + LAN.probe_timeout
        assert msg.seq == ping.seq and msg.source_addr == a.address and msg.nack
        assert msg.target == target.id and msg.target_addr == target.address


def test_ack_relayed_by_a_helper_completes_the_probe_and_lowers_awareness():
    # Only the prober's direct pings are lost: the helpers reach the target.
    a_direct = lambda src, dst, msg: src.address == address(1) and isinstance(msg, Ping)  # noqa: E731
    nodes = [make_node(i) for i in range(1, 6)]
    net = mesh(*nodes, drop=a_direct)
    a = nodes[0]
    a.awareness.score = 2  # probe timeout 1.5 s, interval 3 s
    t0 = net.run(5.0, active=[a], stop=lambda: net.sent_by(a, Ping))
    (_, target_addr, ping) = net.sent_by(a, Ping)[0]
    target = net.nodes[target_addr]
    net.run(t0 + 3 * LAN.probe_interval - 1e-6, active=[a])
    asks = net.sent_by(a, IndirectPing)
    assert [t for t, _, _ in asks] == [t0 + 3 * LAN.probe_timeout] * LAN.indirect_checks
    relayed = [
        m
        for _, src, addr, m in net.log
        if isinstance(m, Ack) and addr == a.address and src is not target
    ]
    assert relayed and all(m.seq == ping.seq for m in relayed)
    assert a.awareness.score == 1
    assert a.members[target.id].status is Status.ALIVE
    assert a.counters["probe-failures"] == 0


def test_unanswered_probe_suspects_after_scaled_interval_and_counts_missing_nacks():
    # Every ping is lost and the helpers are never run, so no nack comes back.
    drop_pings = lambda src, dst, msg: isinstance(msg, Ping)  # noqa: E731
    nodes = [make_node(i) for i in range(1, 6)]
    net = mesh(*nodes, drop=drop_pings)
    a = nodes[0]
    a.awareness.score = 1  # probe timeout 1 s, interval 2 s
    t0 = net.run(5.0, active=[a], stop=lambda: net.sent_by(a, Ping))
    target = net.nodes[net.sent_by(a, Ping)[0][1]]
    net.run(t0 + 2 * LAN.probe_interval - 1e-6, active=[a])
    assert [t for t, _, _ in net.sent_by(a, IndirectPing)] == [t0 + 2 * LAN.probe_timeout] * 3
    assert a.members[target.id].status is Status.ALIVE
    assert a.awareness.score == 1
    net.run(t0 + 2 * LAN.probe_interval, active=[a])
    assert a.members[target.id].status is Status.SUSPECT
    assert a.awareness.score == 1 + LAN.indirect_checks
    assert a.counters["probe-failures"] >= 1
    assert MemberChanged(target.id, Status.SUSPECT, target.incarnation, target.address) in (
        drain_events(a)
    )


def test_direct_ack_lowers_awareness():
    a, b = make_node(1), make_node(2)
    net = mesh(a, b)
    a.awareness.score = 3
    net.run(5.0, active=[a], stop=lambda: net.sent_by(a, Ping))
    assert a.awareness.score == 2
    assert a.members[b.id].status is Status.ALIVE


def test_nacks_from_healthy_helpers_arrive_before_the_probe_ends():
    c = Cluster(5, seed=1, ca=CA)
    c.run_until_true(lambda: all(n == 5 for n in c.alive_counts()), 10.0)
    c.crash(4)
    worst = 0
    while c.now < 30.0 and c.step():
        worst = max(worst, *(c.core(i).awareness.score for i in range(4)))
    assert all(c.status_of(i, 4) is Status.DEAD for i in range(4))
    # Four healthy nodes, no loss: every helper nacks, so no prober is to blame.
    assert worst == 0


# ---------------------------------------------------------------------------
# Acting as a helper


def test_helper_pings_target_and_forwards_its_ack_with_the_requesters_seq():
    a, h, t = make_node(1), make_node(2), make_node(3)
    h.receive(
        IndirectPing(a.id, seq=77, source_addr=a.address, target=t.id, target_addr=t.address),
        5.0,
        peer=a.id,
    )
    pings = sent(h, Ping)
    assert len(pings) == 1
    addr, ping = pings[0]
    assert addr == t.address and ping.target == t.id and ping.source_addr == h.address
    t.receive(ping, 5.0, peer=h.id)
    (ack_addr, ack) = sent(t, Ack)[0]
    assert ack_addr == h.address
    h.receive(ack, 5.001, peer=t.id)
    forwarded = sent(h, Ack)
    assert [(addr, m.seq) for addr, m in forwarded] == [(a.address, 77)]
    # Answered: no nack later.
    h.handle_timer(5.0 + LAN.probe_timeout)
    assert sent(h, Nack) == []


def test_helper_nacks_after_probe_timeout_when_target_is_silent():
    a, h, t = make_node(1), make_node(2, now=5.0), make_node(3)
    ind = IndirectPing(a.id, seq=78, source_addr=a.address, target=t.id, target_addr=t.address)
    h.receive(ind, 5.0, peer=a.id)
    net = Net(h)  # alone: the target never answers, the nack goes nowhere
    net.now = 5.0
    net.run(7.0)  # driven only by h's own get_timer()
    nacks = net.sent_by(h, Nack)
    assert [(t, addr, m.seq) for t, addr, m in nacks] == [
        (5.0 + nack_timeout(LAN.probe_timeout), a.address, 78)
    ]


def test_helper_asked_for_no_nack_stays_silent():
    a, h, t = make_node(1), make_node(2), make_node(3)
    ind = IndirectPing(
        a.id, seq=79, source_addr=a.address, target=t.id, target_addr=t.address, nack=False
    )
    h.receive(ind, 5.0, peer=a.id)
    h.messages_to_send()
    h.handle_timer(5.0 + LAN.probe_timeout)
    assert sent(h, Nack) == []


# ---------------------------------------------------------------------------
# Suspicion and death


def _healthy_a(a: Core) -> None:
    """Keep A's own local health out of the timings: only A runs its timers
    here, so the helpers of its indirect probes never nack, and the missing
    nacks would make A hold its verdicts as a sick node does (tested apart)."""
    a.prober.awareness = Awareness(1)


def _suspect_x(config: Config = LAN):
    """A, B, C, D and X know each other; X is unreachable; B suspects X at t=10."""
    nodes = [make_node(i, config=config) for i in range(1, 6)]
    a, b, c, d, x = nodes
    _healthy_a(a)
    net = mesh(*nodes, drop=lambda src, dst, msg: x.address in (dst, src.address))
    net.now = 10.0
    gossip(b, a, 10.0, claim(Status.SUSPECT, x, b))
    net.flush(10.0)
    assert a.members[x.id].status is Status.SUSPECT
    return net, a, b, c, d, x


def _status_at(net: Net, a: Core, x: Core, t: float) -> Status:
    net.run(t, active=[a])
    return a.members[x.id].status


def _a_suspects_x():
    """As _suspect_x, but A's own failed probe starts the suspicion; its start time."""
    nodes = [make_node(i) for i in range(1, 6)]
    a, b, c, d, x = nodes
    _healthy_a(a)
    net = mesh(*nodes, drop=lambda src, dst, msg: x.address in (dst, src.address))
    net.run(10.0, active=[a], stop=lambda: a.members[x.id].status is Status.SUSPECT)
    assert a.members[x.id].status is Status.SUSPECT
    return net, a, b, c, d, x, a.members[x.id].since


def test_suspicion_without_confirmations_runs_the_full_lifeguard_timeout():
    net, a, b, c, d, x, start = _a_suspects_x()
    lo, hi = a.suspicion_bounds()
    assert (lo, hi) == (4.0, 24.0)  # 4 * max(1, log10 5) * 1 s, times 6
    # A keeps probing X and failing, but that is A's word again: no confirmation.
    assert _status_at(net, a, x, start + hi - 1e-6) is Status.SUSPECT
    assert _status_at(net, a, x, start + hi) is Status.DEAD
    assert a.counters["declared-dead"] == 1
    assert MemberChanged(x.id, Status.DEAD, x.incarnation, x.address) in drain_events(a)
    # Its origin is now a tombstone, not served.
    assert held(a, x.id).tombstone_since == start + hi
    assert x.id not in {e.signed.origin for e in a.store.live()}
    # A newer state of a dead origin is kept, but as a tombstone.
    v = x.set_app(rec(), 40.0)
    gossip(x, a, 40.0, states=[held(x, x.id).signed])
    assert a.store.version(x.id) == v
    assert held(a, x.id).tombstone_since == 40.0
    assert a.store.endpoints("orders") == []


def test_a_sick_node_holds_its_verdict_until_its_health_returns():
    # Lifeguard's local health: a node whose own probes fail may be the slow
    # one, hearing the refutation late; it holds its own verdict.
    net, a, b, c, d, x, start = _a_suspects_x()
    lo, hi = a.suspicion_bounds()
    a.prober.awareness = sick = Awareness(a.config.awareness_max_multiplier)
    sick.score = sick_score = a.config.awareness_max_multiplier - 1
    assert _status_at(net, a, x, start + hi) is Status.SUSPECT
    assert a.counters["verdict-held"] >= 1 and a.counters["declared-dead"] == 0
    # Held at most (score + 1) times the timeout...
    assert _status_at(net, a, x, start + (sick_score + 1) * hi) is Status.DEAD
    # ...and no longer than one probe interval once it is healthy again.
    net, a, b, c, d, x, start = _a_suspects_x()
    a.prober.awareness = sick = Awareness(a.config.awareness_max_multiplier)
    sick.score = sick_score
    assert _status_at(net, a, x, start + hi + 0.5) is Status.SUSPECT
    _healthy_a(a)
    assert _status_at(net, a, x, start + hi + 0.5 + a.config.probe_interval) is Status.DEAD


def test_without_lifeguard_a_sick_node_does_not_hold_its_verdict():
    net, a, b, c, d, x = _suspect_x(config=replace(LAN, lifeguard=False))
    lo, _ = a.suspicion_bounds()
    a.prober.awareness.score = 5
    assert _status_at(net, a, x, 10.0 + lo) is Status.DEAD


def test_distinct_confirmations_shrink_the_timer_and_repeats_do_not():
    net, a, b, c, d, x, start = _a_suspects_x()
    lo, hi = a.suspicion_bounds()
    gossip(a, a, start, claim(Status.SUSPECT, x, a))  # the accuser again: not a confirmation
    gossip(b, a, start + 1.0, claim(Status.SUSPECT, x, b))  # one confirmation
    gossip(b, a, start + 2.0, claim(Status.SUSPECT, x, b))  # a repeat: not another
    one = start + suspicion_timeout(1, 2, lo, hi)
    assert start + lo < one < start + hi
    assert _status_at(net, a, x, one - 1e-6) is Status.SUSPECT
    assert _status_at(net, a, x, one) is Status.DEAD


def _synced_list_about(x: Core, b: Core) -> Gossip:
    """What a sync's member list says about a suspected X (anti_entropy.full_member_list):
    its own alive claim, then the accusation, which names X itself (no accuser)."""
    return Gossip(b.id, members=(claim(Status.ALIVE, x, x), claim(Status.SUSPECT, x, x)), sync=True)


def test_a_suspicion_in_a_synced_member_list_is_no_confirmation():
    # At 1,000 nodes under 10% loss every suspicion met a sync within its
    # timeout; counted as a confirmation, the list's accusation (naming the
    # suspect itself) cut the Lifeguard timeout from 72 s to 34 s, and the
    # observers a refutation had not yet reached declared running nodes dead.
    net, a, b, c, d, x, start = _a_suspects_x()
    lo, hi = a.suspicion_bounds()
    a.receive(_synced_list_about(x, b), start + 1.0, peer=b.id)
    gossip(c, a, start + 1.5, claim(Status.SUSPECT, x, x))  # nor by gossip
    assert _status_at(net, a, x, start + suspicion_timeout(1, 2, lo, hi)) is Status.SUSPECT
    assert _status_at(net, a, x, start + hi - 1e-6) is Status.SUSPECT
    assert _status_at(net, a, x, start + hi) is Status.DEAD


def test_a_failed_probe_of_a_member_suspected_by_another_confirms_it():
    net, a, b, c, d, x = _suspect_x()  # B accuses X
    lo, hi = a.suspicion_bounds()
    start = len(net.log)
    # A's own probe of X fails within one probe round of the five members.
    one = 10.0 + suspicion_timeout(1, 2, lo, hi)
    assert _status_at(net, a, x, one - 1e-6) is Status.SUSPECT
    assert a.counters["probe-failures"] >= 1
    said = [u for _, src, _, m in net.log[start:] if src is a for u in getattr(m, "members", ())]
    assert claim(Status.SUSPECT, x, a) in said  # passed on for others to count
    assert _status_at(net, a, x, one) is Status.DEAD


def test_enough_confirmations_bring_the_timer_down_to_the_minimum():
    net, a, b, c, d, x = _suspect_x()
    lo, _ = a.suspicion_bounds()
    gossip(c, a, 11.0, claim(Status.SUSPECT, x, c))
    gossip(d, a, 12.0, claim(Status.SUSPECT, x, d))
    assert _status_at(net, a, x, 10.0 + lo - 1e-6) is Status.SUSPECT
    assert _status_at(net, a, x, 10.0 + lo) is Status.DEAD


def test_without_lifeguard_the_suspicion_timeout_is_the_fixed_minimum():
    net, a, b, c, d, x = _suspect_x(Config.lan(lifeguard=False))
    lo, hi = a.suspicion_bounds()
    assert lo == hi == 4.0
    gossip(c, a, 11.0, claim(Status.SUSPECT, x, c))
    gossip(d, a, 11.5, claim(Status.SUSPECT, x, d))
    assert _status_at(net, a, x, 10.0 + lo - 1e-6) is Status.SUSPECT
    assert _status_at(net, a, x, 10.0 + lo) is Status.DEAD


# ---------------------------------------------------------------------------
# Refutation


@pytest.mark.parametrize("status", [Status.SUSPECT, Status.DEAD])
def test_claim_about_self_is_refuted_and_others_take_it_back(status):
    a, b, x = make_node(1), make_node(2), make_node(3)
    net = mesh(a, b, x)
    inc = x.incarnation
    gossip(a, b, 1.0, claim(status, x, a))
    assert b.members[x.id].status is status
    gossip(a, x, 1.0, claim(status, x, a))
    assert x.incarnation == inc + 1
    assert x.members[x.id].status is Status.ALIVE
    assert x.counters["refutations"] == 1
    assert x.awareness.score == 1  # having to refute is evidence against ourselves
    net.now = 1.0
    net.flush(1.0)
    net.run(3.0)
    refutation = claim(Status.ALIVE, x, x, inc + 1)
    assert any(refutation in getattr(m, "members", ()) for _, _, m in net.sent_by(x, object))
    assert b.members[x.id].status is Status.ALIVE
    assert b.members[x.id].incarnation == inc + 1


def test_stale_claim_about_self_is_not_refuted():
    a, x = make_node(1), make_node(3, incarnation=4)
    assert x.incarnation == 5
    gossip(a, x, 1.0, claim(Status.SUSPECT, x, a, incarnation=4))
    gossip(a, x, 1.0, claim(Status.DEAD, x, a, incarnation=4))
    assert x.incarnation == 5
    assert x.counters["refutations"] == 0
    assert x.members[x.id].status is Status.ALIVE


def test_buddy_suspicion_on_a_ping_is_refuted_at_once_in_the_ack():
    a, x = make_node(1), make_node(3)
    inc = x.incarnation
    ping = Ping(
        a.id, seq=9, source_addr=a.address, target=x.id, suspicion=claim(Status.SUSPECT, x, a)
    )
    x.receive(ping, 2.0, peer=a.id)
    assert x.incarnation == inc + 1
    (_, ack) = sent(x, Ack)[0]
    assert ack.seq == 9
    assert claim(Status.ALIVE, x, x, inc + 1) in ack.members


@pytest.mark.parametrize("lifeguard", [True, False])
def test_prober_attaches_buddy_suspicion_only_with_lifeguard(lifeguard):
    cfg = Config.lan(lifeguard=lifeguard)
    a, x = make_node(1, config=cfg), make_node(3, config=cfg)
    net = mesh(a, x, drop=lambda src, dst, msg: dst == x.address)
    t0 = net.run(5.0, active=[a], stop=lambda: net.sent_by(a, Ping))
    net.run(t0 + cfg.probe_interval, active=[a])
    assert a.members[x.id].status is Status.SUSPECT
    pings = net.sent_by(a, Ping)
    assert len(pings) == 2  # the failed probe, then the next one to the suspect
    buddy = pings[1][2].suspicion
    if lifeguard:
        assert buddy == claim(Status.SUSPECT, x, a)
    else:
        assert buddy is None


# ---------------------------------------------------------------------------
# Leave


def test_leave_tells_peers_directly_and_they_tombstone_its_origin():
    a, b, c = make_node(1), make_node(2), make_node(3)
    net = mesh(a, b, c)
    net.run(2.0)
    inc = a.incarnation
    a.leave(2.0)
    out = a.messages_to_send()
    left = claim(Status.LEFT, a, a, inc)
    assert sorted(addr for addr, _ in out) == sorted([b.address, c.address])
    for addr, msg in out:
        assert isinstance(msg, Gossip) and msg.members == (left,)
        net.nodes[addr].receive(msg, 2.0, peer=a.id)
    for peer in (b, c):
        assert peer.members[a.id].status is Status.LEFT
        assert peer.members[a.id].incarnation == inc
        assert held(peer, a.id).tombstone_since == 2.0
        assert a.id not in {e.signed.origin for e in peer.store.live()}
        assert OriginChanged(a.id, a.version, False) in drain_events(peer)
    # The left node does not refute, and no longer probes.
    gossip(b, a, 2.5, claim(Status.SUSPECT, a, b))
    assert a.incarnation == inc and a.counters["refutations"] == 0
    net.now = 2.5
    net.flush(2.5)
    net.run(8.0)
    assert net.sent_by(a, Ping, since=2.0) == []
    assert net.sent_by(a, IndirectPing, since=2.0) == []
    assert b.members[a.id].status is Status.LEFT


def test_idle_node_keeps_gossiping_its_leave_after_the_direct_notices_are_lost():
    a, b, c = make_node(1), make_node(2), make_node(3)
    net = mesh(a, b, c)
    net.run(10.0)  # long enough for every queue to drain
    a.leave(10.0)
    a.messages_to_send()  # the direct notices are lost
    net.run(10.0 + 5 * LAN.gossip_interval, active=[a])
    left = claim(Status.LEFT, a, a, a.incarnation)
    assert any(left in m.members for _, _, m in net.sent_by(a, Gossip, since=10.0))


# ---------------------------------------------------------------------------
# Records


def test_set_app_publishes_a_new_signed_version_that_gossip_spreads():
    a, b = make_node(1), make_node(2)
    net = mesh(a, b)
    net.run(1.0)
    before = a.version
    v = a.set_app(rec(), 1.0)
    assert v == before + 1 == a.version
    own = held(a, a.id)
    assert own.signed.version == v and own.state.apps == (rec(),)
    assert VERIFIER.verify(own.signed) == own.state
    net.run(1.0 + LAN.gossip_interval)  # well before any digest sync could carry it
    carried = [
        (t, addr) for t, addr, m in net.sent_by(a, Gossip) if any(s.version == v for s in m.states)
    ]
    assert carried and carried[0][1] == b.address and carried[0][0] <= 1.0 + LAN.gossip_interval
    assert b.store.version(a.id) == v
    assert [r for _, r in b.store.endpoints("orders")] == [rec()]


def test_remove_app_of_unknown_instance_returns_none_and_changes_nothing():
    a = make_node(1)
    v = a.set_app(rec(), 1.0)
    assert a.remove_app("nope", 2.0) is None
    assert a.version == v
    assert a.remove_app("o-1", 3.0) == v + 1
    assert held(a, a.id).state.apps == ()


def test_restart_outranks_the_previous_life():
    a, b = make_node(1), make_node(2)
    net = mesh(a, b)
    a.set_app(rec(), 0.5)
    net.run(2.0)
    assert b.store.version(a.id) == a.version
    a2 = make_node(1, now=2.0, incarnation=a.incarnation, version=a.version, apps=a.apps.values())
    assert a2.incarnation > a.incarnation
    assert a2.version > a.version
    assert held(a2, a2.id).state.apps == (rec(),)
    net2 = Net(a2, b)
    net2.now = 2.0
    a2.join([b.address], 2.0)
    net2.flush(2.0)
    assert b.members[a.id].incarnation == a2.incarnation
    assert b.store.version(a.id) == a2.version


# ---------------------------------------------------------------------------
# Anti-entropy


def test_push_pull_sends_each_side_only_what_the_other_lacks():
    a, b, c, d, e = (make_node(i) for i in range(1, 6))
    c_v1 = held(c, c.id).signed
    c.set_app(rec(), 0.0)
    c_v2 = held(c, c.id).signed
    d_v1, e_v1 = held(d, d.id).signed, held(e, e.id).signed
    # B holds C@2, D, E; A holds C@1 and E.  Both hold E at the same version.
    gossip(c, b, 0.0, states=[c_v2])
    gossip(d, b, 0.0, states=[d_v1])
    gossip(e, b, 0.0, states=[e_v1])
    gossip(c, a, 0.0, states=[c_v1])
    gossip(e, a, 0.0, states=[e_v1])
    assert b.store.version(c.id) == 2 and a.store.version(c.id) == 1

    a.messages_to_send()
    b.messages_to_send()
    a.join([b.address], 1.0)
    (addr, pp) = a.messages_to_send()[0]
    assert addr == b.address and isinstance(pp, PushPull)
    assert pp.digest == {a.id: 1, c.id: 1, e.id: 1}
    b.receive(pp, 1.0, peer=a.id)
    replies = b.messages_to_send()
    assert len(replies) == 1
    addr, reply = replies[0]
    assert addr == a.address and isinstance(reply, PushPullReply)
    assert {(s.origin, s.version) for s in reply.states} == {(b.id, 1), (c.id, 2), (d.id, 1)}
    assert reply.digest == b.store.digest()

    a.receive(reply, 1.0, peer=b.id)
    back = a.messages_to_send()
    assert len(back) == 1
    addr, push = back[0]
    assert addr == b.address and isinstance(push, Gossip)
    assert [(s.origin, s.version) for s in push.states] == [(a.id, 1)]
    b.receive(push, 1.0, peer=a.id)
    assert a.store.digest() == b.store.digest()


def test_digest_sync_with_equal_views_is_answered_without_members():
    a, b = make_node(1), make_node(2)
    mesh(a, b)
    assert a.view == b.view
    b.messages_to_send()
    digest_only = PushPull(a.id, source_addr=a.address, digest=a.store.digest(), view=a.view)
    b.receive(digest_only, 1.0, peer=a.id)
    (_, reply) = b.messages_to_send()[0]
    assert isinstance(reply, PushPullReply)
    assert reply.members == () and reply.states == ()
    assert reply.view == b.view


def test_digest_sync_with_different_views_is_answered_with_members():
    a, b, c = make_node(1), make_node(2), make_node(3)
    mesh(a, b)
    Net(a, c).flush(0.0)
    c.join([a.address], 0.0)
    Net(a, c).flush(0.0)
    assert c.id in a.members and c.id not in b.members
    assert a.view != b.view
    b.messages_to_send()
    digest_only = PushPull(a.id, source_addr=a.address, digest=a.store.digest(), view=a.view)
    b.receive(digest_only, 1.0, peer=a.id)
    (_, reply) = b.messages_to_send()[0]
    assert isinstance(reply, PushPullReply)
    assert {u.member for u in reply.members} == {a.id, b.id}
    assert b.view == reply.view


def test_a_peer_that_forgot_us_gets_our_claim_and_then_answers_in_full():
    """After a long partition one side may have reaped the other: its sync
    answer to a sender it cannot place is fingerprints only, marked UNPLACED,
    and the sender follows with a full sync (its own claim first), after which
    it is placed and answered in full.  Without that step the two would never
    heal: the sync answer goes only where the sender's claim says."""
    from meshd.protocol.anti_entropy import UNPLACED

    a, b = make_node(1), make_node(2)
    a.receive(Gossip(b.id, members=(b.members[b.id].update_for(Status.ALIVE, b.id),)), 0.0)
    a.messages_to_send()
    b.messages_to_send()
    assert b.id in a.members and a.id not in b.members

    a.anti_entropy.send_sync(b.address, b.id, full=False, dest_cluster=b.cluster)
    [(to_b, opener)] = a.messages_to_send()
    assert to_b == b.address and isinstance(opener, PushPull) and opener.members == ()
    b.receive(opener, 1.0, peer=a.id)
    [(to_a, reply)] = b.messages_to_send()
    assert to_a == a.address and isinstance(reply, PushPullReply)
    assert (reply.members, reply.digest, reply.states, reply.view) == ((), {}, (), UNPLACED)
    assert b.counters["rejected-state:unplaced-sync"] == 1

    a.receive(reply, 1.0, peer=b.id)
    [(to_b, full)] = [(d, m) for d, m in a.messages_to_send() if isinstance(m, PushPull)]
    assert to_b == b.address and full.members[0].member == a.id  # our claim first
    b.receive(full, 2.0, peer=a.id)
    assert a.id in b.members
    answers = b.messages_to_send()
    assert {d for d, _ in answers} == {a.address}
    assert any(isinstance(m, PushPullReply) and m.members for _, m in answers)


def test_a_restart_at_a_new_address_without_its_state_is_placed_again():
    """A node that lost its state directory restarts at incarnation 0 and at
    another address; its peer holds it at incarnation 5 and the old address,
    so its claim is stale and its join cannot be answered where it says.  The
    fingerprint answer carries the peer's entry for it: it refutes that life
    and follows with a full sync, which places it at its new address."""
    from meshd.protocol.anti_entropy import UNPLACED

    old, b = make_node(1, incarnation=5), make_node(2)
    mesh(old, b)
    assert b.members[old.id].incarnation >= 5
    new = Core(
        config=LAN, node="n1", cluster="east", address="127.0.0.1:29999", signer=signer("n1"),
        verifier=VERIFIER, rng=random.Random(9), now=10.0, region="r1", zone="z1",
    )  # fmt: skip
    new.join([b.address], 10.0)
    [(to_b, opener)] = new.messages_to_send()
    b.receive(opener, 10.0, peer=new.id)
    [(to_new, reply)] = b.messages_to_send()
    assert to_new == new.address and isinstance(reply, PushPullReply)
    assert reply.view == UNPLACED and [u.member for u in reply.members] == [new.id]

    new.receive(reply, 10.0, peer=b.id)
    assert new.incarnation > b.members[old.id].incarnation  # refuted the old life
    new.messages_to_send()
    # It knows no one yet, so it retries its join, now with the new life.
    new.handle_timer(12.0)
    [(to_b, full)] = [(d, m) for d, m in new.messages_to_send() if isinstance(m, PushPull)]
    assert to_b == b.address and full.join and full.members[0].member == new.id
    b.receive(full, 12.0, peer=new.id)
    assert b.members[new.id].address == new.address
    answers = b.messages_to_send()
    assert {d for d, _ in answers} == {new.address}
    assert any(isinstance(m, PushPullReply) and m.members for _, m in answers)


def test_syncs_between_agreeing_members_carry_fingerprints_only():
    nodes = [make_node(i) for i in range(1, 5)]
    net = mesh(*nodes)
    start = len(net.log)
    net.run(6 * LAN.digest_interval)
    syncs = [m for _, _, _, m in net.log[start:] if isinstance(m, PushPull | PushPullReply)]
    assert len(syncs) >= 2 * len(nodes)
    for m in syncs:
        # No member list and no digest: O(1) however large the pool.
        assert m.members == () and m.digest == {} and getattr(m, "states", ()) == ()
        assert m.records == nodes[0].store.fingerprint != 0


def test_fingerprint_mismatch_repairs_what_each_side_lacks():
    a, b, c, d = (make_node(i) for i in range(1, 5))
    net = mesh(a, b)
    net.run(10.0)
    # Each holds a document the other lacks (as a sync answer: not re-gossiped).
    a.receive(Gossip(c.id, states=(held(c, c.id).signed,), sync=True), 10.0, peer=c.id)
    b.receive(Gossip(d.id, states=(held(d, d.id).signed,), sync=True), 10.0, peer=d.id)
    assert a.store.fingerprint != b.store.fingerprint
    start = len(net.log)
    net.run(10.0 + 2 * LAN.digest_interval, stop=lambda: a.store.digest() == b.store.digest())
    assert a.store.digest() == b.store.digest() == {a.id: 1, b.id: 1, c.id: 1, d.id: 1}
    assert a.store.fingerprint == b.store.fingerprint
    kinds = [
        (type(m).__name__, bool(m.digest))
        for _, _, _, m in net.log[start:]
        if isinstance(m, PushPull | PushPullReply)
    ]
    # Fingerprints first; the reply to a mismatch carries a digest; the opener,
    # which lacks something, asks again with its own.
    assert kinds[:3] == [("PushPull", False), ("PushPullReply", True), ("PushPull", True)]


def adopters_and_reference():
    """A seed that knows x and y; x and y adopt its view; z (x's twin) is given
    the same view by receiving the full sync that would build it."""
    a, b, c = (make_node(i) for i in range(1, 4))
    mesh(a, b, c)
    x, y = make_node(5), make_node(6)
    for n in (x, y):
        gossip(n, a, 1.0, claim(Status.ALIVE, n, n), states=[held(n, n.id).signed])
    view = a.snapshot()
    x.adopt(view)
    y.adopt(view)
    z = make_node(5)
    states = tuple(e.signed for e in a.store.live())
    z.receive(
        PushPullReply(
            a.id,
            digest=a.store.digest(),
            members=a.anti_entropy.full_member_list()[0],
            states=states,
        ),
        1.0,
        peer=a.id,
    )
    return a, x, y, z


def summary(n: Core):
    return (
        {m.id: (m.status, m.incarnation, m.address) for m in n.members.values()},
        n.view,
        n.pool_size,
        n.store.digest(),
        n.store.fingerprint,
    )


def test_adopting_a_view_equals_receiving_the_full_sync():
    a, x, y, z = adopters_and_reference()
    assert summary(x) == summary(z)
    assert summary(x)[0].keys() == {f"east/n{i}" for i in (1, 2, 3, 5, 6)}
    assert x.pool_size == 5 and x.store.endpoints("orders") == z.store.endpoints("orders")


def test_adopted_view_is_copied_on_the_first_change():
    a, x, y, z = adopters_and_reference()
    before = summary(y)
    gossip(a, x, 2.0, claim(Status.SUSPECT, a, "east/n2"))
    x.set_app(rec(), 2.0)
    assert x.members[a.id].status is Status.SUSPECT
    assert x.store.endpoints("orders") != []
    assert summary(y) == before  # the other adopter and the seed see nothing of it
    assert a.members[a.id].status is Status.ALIVE and a.store.endpoints("orders") == []
    assert x.view != y.view and x.store.fingerprint != y.store.fingerprint


def test_adopt_refuses_a_view_that_does_not_list_the_core_as_it_is():
    a, b = make_node(1), make_node(2)
    mesh(a, b)
    stranger = make_node(7)
    with pytest.raises(ValueError, match="does not list"):
        stranger.adopt(a.snapshot())
    with pytest.raises(ValueError, match="knows no one"):
        b.adopt(a.snapshot())


# ---------------------------------------------------------------------------
# Rejected states


def test_state_with_altered_body_is_rejected_as_bad_signature():
    a, b = make_node(1), make_node(2)
    a.set_app(rec(), 0.0)
    good = held(a, a.id).signed
    other = OriginState(node="n1", cluster="east", region="r1", zone="z1", version=good.version)
    forged = SignedState(good.origin, good.version, other.encode(), good.signature, good.cert)
    drain_events(b)
    gossip(a, b, 1.0, states=[forged])
    assert b.counters["rejected-state:bad-signature"] == 1
    assert b.store.get(a.id) is None
    assert drain_events(b) == []


def test_state_signed_by_another_nodes_key_is_rejected_as_node_mismatch():
    b = make_node(2)
    n9 = signer("n9").node_cert
    assert isinstance(n9.key, ed25519.Ed25519PrivateKey)
    body = OriginState(node="n1", cluster="east", region="r1", zone="z1", version=5).encode()
    forged = SignedState("east/n1", 5, body, n9.key.sign(body), n9.cert_der)
    b.receive(Gossip("east/n9", states=(forged,)), 1.0, peer="east/n9")
    assert b.counters["rejected-state:node-mismatch"] == 1
    assert b.store.get("east/n1") is None


# ---------------------------------------------------------------------------
# Timers


def test_next_deadline_is_never_in_the_past_after_handle_timer():
    nodes = [make_node(i) for i in range(1, 5)]
    loss = random.Random(3)
    net = mesh(
        *nodes,
        drop=lambda src, dst, msg: dst == address(4) or loss.random() < 0.2,
    )
    checked = 0
    for _ in range(5000):
        t = min(n.get_timer() for n in nodes)
        if t > 60.0:
            break
        net.now = max(net.now, t)
        for n in nodes:
            if n.get_timer() <= net.now:
                n.handle_timer(net.now)
                assert n.get_timer() > net.now
                checked += 1
                net.flush(net.now)
    assert checked > 100
    assert nodes[0].members[nodes[3].id].status is Status.DEAD


def test_handle_timer_after_a_long_pause_is_sane():
    nodes = [make_node(i) for i in range(1, 5)]
    a, h, t, x = nodes
    net = mesh(*nodes, drop=lambda src, dst, msg: True)
    # Leave a probe, a relay and a suspicion in flight, then sleep an hour and more.
    net.run(5.0, active=[a], stop=lambda: net.sent_by(a, Ping))
    a.receive(
        IndirectPing(h.id, seq=5, source_addr=h.address, target=t.id, target_addr=t.address),
        net.now,
        peer=h.id,
    )
    gossip(h, a, net.now, claim(Status.SUSPECT, x, h))
    late = net.now + 2 * LAN.tombstone_timeout
    a.handle_timer(late)
    nxt = a.get_timer()
    cap = LAN.probe_interval * LAN.awareness_max_multiplier
    assert late < nxt <= late + cap
    assert a.members[x.id].status is Status.DEAD
    kinds = {type(m) for _, m in a.messages_to_send()}
    assert Nack in kinds  # the overdue relay still answers its requester
    a.handle_timer(nxt)
    assert a.get_timer() > nxt


# ---------------------------------------------------------------------------
# Determinism


def _trace(seed: int) -> list[tuple[float, int, object]]:
    c = Cluster(8, seed=seed, ca=CA, loss=0.05)
    seen: list[tuple[float, int, object]] = []
    c.observers.append(lambda i, e, now: seen.append((now, i, e)))
    c.run_until(10.0)
    c.register(2, "orders", "o-1")
    c.run_until(20.0)
    c.crash(5)
    c.run_until(60.0)
    return seen


def test_same_seed_same_observations():
    first, second = _trace(7), _trace(7)
    assert len(first) > 50
    assert {type(e) for _, _, e in first} == {MemberChanged, OriginChanged}
    assert any(isinstance(e, MemberChanged) and e.status is Status.DEAD for _, _, e in first)
    assert first == second


def test_every_message_type_has_its_handler():
    """Adding a message type means adding its line to the dispatch table."""
    from meshd.protocol.core import _HANDLERS
    from meshd.wire import MESSAGE_CLASSES

    assert set(_HANDLERS) == set(MESSAGE_CLASSES.values())


def test_one_message_carries_enough_refutations_for_a_thousand_members_under_loss():
    # An alive claim carries a certificate.  At 1,000 members under 10% loss
    # ~7 refutations a second each need 16 sends from every node; with two
    # claims a message (1400 B) the queue fell behind and observers missed
    # refutations until their suspicion ran out (simulations/RESULTS.md).
    nodes = [make_node(i) for i in range(1, 17)]
    a = nodes[0]
    for n in nodes[1:]:
        a.gossip.member_q.push(n.id, claim(Status.ALIVE, n, n))
    members, _ = a.gossip.piggyback(nodes[1].id)
    assert len(members) >= 12
