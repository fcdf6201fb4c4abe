"""A peer holding a valid certificate that lies, on the in-memory harness.

A rogue node (never part of the honest cluster's harness, but holding a
certificate of its CA) sends honest cores arbitrary well-formed messages:
accusations at any incarnation, alive and left claims for others (unsigned,
signed by itself, or with another's certificate and a junk signature), states
for others and for the receiver itself, down statements, phantom members,
replays of what honest nodes said.  Every message goes through the wire codec
first, as it would from a socket.

The invariant, checked after the attack and one repair bound of virtual time:
every honest node lists every honest node alive and serves every honest
registration, and no honest node's incarnation or version moved further than
its own refutations and republishing account for.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from meshd.identity import StateSigner, issue_node_cert
from meshd.protocol.config import Config
from meshd.protocol.core import Core
from meshd.testing import Cluster
from meshd.wire import (
    AppRecord,
    Gossip,
    MemberClaim,
    MemberUpdate,
    Message,
    OriginState,
    Ping,
    PushPull,
    PushPullReply,
    Revocations,
    SignedClaim,
    SignedState,
    Status,
    decode_message,
    encode_message,
)

HONEST = 4
#: Virtual seconds after the attack within which everything must be repaired:
#: a refutation spreads in a few gossip rounds, a republished document in a
#: few more, and anti-entropy (local profile: every 2 s) repairs the rest.
REPAIR_BOUND = 30.0
#: How far an honest counter may move during one attack: a refutation or a
#: republish per accepted lie at most, and the attack has at most this many steps.
STEPS = 25
MAX_INT = 2**63 - 1

incarnations = st.one_of(st.integers(0, 8), st.just(MAX_INT), st.integers(0, MAX_INT))


@dataclass
class Rogue:
    name: str
    cluster: str
    bridge: bool
    signer: StateSigner

    @property
    def id(self) -> str:
        return f"{self.cluster}/{self.name}"


def build(kind: str) -> tuple[Cluster, Rogue]:
    c = Cluster(HONEST, seed=7, config=Config.local())
    for i in range(HONEST):
        c.register(i, "orders", f"orders-{i}", port=9000 + i)
    took = c.run_until_true(
        lambda: all(len(c.resolve(i, "orders")) == HONEST for i in c.running()), 30
    )
    assert took is not None
    cluster = "west" if kind == "other-cluster" else "east"
    bridge = kind == "bridge"
    nc = issue_node_cert(c.ca, "rogue", cluster, bridge=bridge)
    return c, Rogue("rogue", cluster, bridge, StateSigner(nc))


def honest_ok(c: Cluster) -> bool:
    for i in c.running():
        for j in c.running():
            if i != j and c.status_of(i, j) is not Status.ALIVE:
                return False
        if {rec.instance for _, rec in c.core(i).store.endpoints("orders")} != {
            f"orders-{k}" for k in range(HONEST)
        }:
            return False
    return True


class RogueMachine(RuleBasedStateMachine):
    """One attack: a cluster of four honest nodes and one rogue (see module doc)."""

    kind = "same-cluster"

    @initialize()
    def setup(self) -> None:
        self.c, self.rogue = build(self.kind)
        self.start = {
            i: (self.c.core(i).incarnation, self.c.core(i).version) for i in self.c.running()
        }
        self.sent = 0
        # Everything honest nodes said so far, for replays.
        self.seen_claims = [m.claim for m in self.c.core(0).members.values() if m.claim is not None]
        self.seen_states = [e.signed for e in self.c.core(0).store.live()]

    # -- sending -----------------------------------------------------------

    def send(self, dst: int, msg: Message) -> None:
        wire = decode_message(encode_message(msg))  # exactly what a socket would hand over
        assert isinstance(wire, Message), wire
        self.c.inject(dst, wire, as_peer=self.rogue.id)
        self.sent += 1

    def carrier(self, kind: int, dst: int, **payload: object) -> Message:
        rid = self.rogue.id
        if kind == 0:
            return Gossip(rid, **payload)  # type: ignore[arg-type]
        if kind == 1:
            payload.pop("states", None)  # a push-pull opens with members and a digest only
            return PushPull(rid, source_addr="127.0.0.1:1", **payload)  # type: ignore[arg-type]
        if kind == 2:
            return PushPullReply(rid, **payload)  # type: ignore[arg-type]
        return Ping(rid, seq=1, source_addr="127.0.0.1:1", target=self.c.nodes[dst].id, **payload)  # type: ignore[arg-type]

    # -- the lies --------------------------------------------------------------

    @rule(
        dst=st.integers(0, HONEST - 1),
        victim=st.integers(0, HONEST - 1),
        status=st.sampled_from([Status.SUSPECT, Status.DEAD]),
        inc=incarnations,
        by=st.sampled_from(["east/n0", "east/ghost", "west/x", "east/rogue"]),
        kind=st.integers(0, 3),
    )
    def accuse(self, dst: int, victim: int, status: Status, inc: int, by: str, kind: int) -> None:
        v = self.c.nodes[victim]
        u = MemberUpdate(status, v.id, inc, v.address, v.region, v.zone, by)
        self.send(dst, self.carrier(kind, dst, members=(u,)))

    @rule(
        dst=st.integers(0, HONEST - 1),
        victim=st.integers(0, HONEST - 1),
        status=st.sampled_from([Status.ALIVE, Status.LEFT]),
        inc=incarnations,
        how=st.sampled_from(["unsigned", "self-signed", "junk-signature", "stolen-cert"]),
        kind=st.integers(0, 3),
    )
    def impersonate(
        self, dst: int, victim: int, status: Status, inc: int, how: str, kind: int
    ) -> None:
        v = self.c.nodes[victim]
        body = MemberClaim(status, v.id, inc, "127.0.0.1:6666", "evil", "evil")
        real = self.c.core(victim).members[v.id].claim
        assert real is not None
        claim: SignedClaim | None
        if how == "unsigned":
            claim = None
        elif how == "self-signed":
            s = self.rogue.signer.sign_claim(
                MemberClaim(status, self.rogue.id, inc, "127.0.0.1:6666")
            )
            claim = SignedClaim(body.encode(), s.signature, s.cert)
        elif how == "junk-signature":
            claim = SignedClaim(body.encode(), b"\x01" * 64, real.cert)
        else:
            claim = SignedClaim(body.encode(), real.signature, real.cert)
        u = MemberUpdate(status, v.id, inc, "127.0.0.1:6666", "evil", "evil", v.id, claim)
        self.send(dst, self.carrier(kind, dst, members=(u,)))

    @rule(dst=st.integers(0, HONEST - 1), count=st.integers(1, 40), kind=st.integers(0, 2))
    def phantoms(self, dst: int, count: int, kind: int) -> None:
        """Made-up alive members: each 'signed' by the rogue for another name."""
        updates = []
        for k in range(count):
            mid = f"{self.rogue.cluster}/phantom{k}"
            s = self.rogue.signer.sign_claim(
                MemberClaim(Status.ALIVE, self.rogue.id, 1, "127.0.0.1:7000")
            )
            body = MemberClaim(Status.ALIVE, mid, 1, f"127.0.0.1:{7000 + k}").encode()
            updates.append(
                MemberUpdate(
                    Status.ALIVE,
                    mid,
                    1,
                    f"127.0.0.1:{7000 + k}",
                    by=mid,
                    claim=SignedClaim(body, s.signature, s.cert),
                )
            )
        self.send(dst, self.carrier(kind, dst, members=tuple(updates)))

    @rule(
        dst=st.integers(0, HONEST - 1),
        victim=st.integers(0, HONEST - 1),
        version=incarnations,
        how=st.sampled_from(["self-signed", "junk-signature"]),
        kind=st.integers(0, 3),
    )
    def forge_state(self, dst: int, victim: int, version: int, how: str, kind: int) -> None:
        """A document for another node, or for the receiver itself (victim == dst)."""
        v = self.c.nodes[victim]
        evil = AppRecord(app="orders", instance=f"orders-{victim}", address="6.6.6.6", port=1)
        state = OriginState(v.name, v.cluster, "", "", version, apps=(evil,))
        body = state.encode()
        if how == "self-signed":
            sig = self.rogue.signer.node_cert.key.sign(body)  # type: ignore[call-arg]
            cert = self.rogue.signer.node_cert.cert_der
        else:
            sig, cert = b"\x02" * 64, self.c.core(victim).store.get(v.id).signed.cert  # type: ignore[union-attr]
        signed = SignedState(state.origin, version, body, sig, cert)
        self.send(dst, self.carrier(kind, dst, states=(signed,)))

    @rule(
        dst=st.integers(0, HONEST - 1),
        victim=st.integers(0, HONEST - 1),
        version=incarnations,
        rversion=st.integers(1, MAX_INT),
    )
    def state_down(self, dst: int, victim: int, version: int, rversion: int) -> None:
        """The rogue's own signed document, stating an honest member down."""
        v = self.c.nodes[victim]
        down = ((v.id, version),) if v.cluster == self.rogue.cluster else ()
        state = OriginState(
            self.rogue.name,
            self.rogue.cluster,
            "",
            "",
            rversion,
            bridge=True,
            down=down,
            unreachable=("east",) if self.rogue.cluster != "east" else ("west",),
        )
        signed = self.rogue.signer.sign(state)
        self.send(dst, Gossip(self.rogue.id, states=(signed,)))

    @rule(dst=st.integers(0, HONEST - 1), pick=st.integers(0, 1000), kind=st.integers(0, 2))
    def replay(self, dst: int, pick: int, kind: int) -> None:
        """Something an honest node really said, earlier."""
        claim = self.seen_claims[pick % len(self.seen_claims)]
        state = self.seen_states[pick % len(self.seen_states)]
        body = MemberClaim.decode(claim.body)
        u = MemberUpdate(
            body.status, body.member, body.incarnation, body.address, body.region, body.zone,
            body.member, claim,
        )  # fmt: skip
        self.send(dst, self.carrier(kind, dst, members=(u,), states=(state,)))

    @rule(dt=st.floats(0.01, 2.0))
    def time_passes(self, dt: float) -> None:
        self.c.run_for(dt)

    # -- what must hold --------------------------------------------------------

    @invariant()
    def no_counter_jumped(self) -> None:
        if not hasattr(self, "c"):
            return
        for i, (inc, ver) in self.start.items():
            core = self.c.core(i)
            # Each lie buys at most one refutation or one republish.
            assert core.incarnation <= inc + self.sent + 1, (i, core.incarnation)
            assert core.version <= ver + self.sent + 1, (i, core.version)
            assert len(core.members) <= HONEST + 1  # the rogue may be a member; no phantom

    def teardown(self) -> None:
        if hasattr(self, "c"):
            c = self.c
            took = c.run_until_true(lambda: honest_ok(c), REPAIR_BOUND)
            assert took is not None, {
                i: {m.id: m.status.label for m in c.core(i).members.values()} for i in c.running()
            }


class OtherClusterRogue(RogueMachine):
    kind = "other-cluster"


class BridgeRogue(RogueMachine):
    kind = "bridge"


_settings = settings(
    max_examples=30,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

TestSameClusterRogue = RogueMachine.TestCase
TestSameClusterRogue.settings = _settings
TestOtherClusterRogue = OtherClusterRogue.TestCase
TestOtherClusterRogue.settings = _settings
TestBridgeRogue = BridgeRogue.TestCase
TestBridgeRogue.settings = _settings
# One rogue machine in the fast tier; the two others with the slow tests.
pytest.mark.slow(TestSameClusterRogue)
pytest.mark.slow(TestBridgeRogue)


def test_a_huge_accusation_moves_no_counter() -> None:
    """The attack of the issue, by hand: dead at 2^63-1 for every member, to every member."""
    c, rogue = build("same-cluster")
    before = [c.core(i).incarnation for i in range(HONEST)]
    for dst in range(HONEST):
        for victim in range(HONEST):
            v = c.nodes[victim]
            u = MemberUpdate(Status.DEAD, v.id, MAX_INT, v.address, by=rogue.id)
            c.core(dst).receive(Gossip(rogue.id, members=(u,)), c.now, peer=rogue.id)
    c.run_for(5.0)
    assert [c.core(i).incarnation for i in range(HONEST)] == before
    assert honest_ok(c)
    assert c.core(0).counters["rejected-claim:beyond-signed"] >= 1


def test_own_state_with_junk_signature_does_not_move_the_version() -> None:
    c, rogue = build("same-cluster")
    me = c.core(0)
    mine = me.store.get(me.id)
    assert mine is not None
    forged = SignedState(me.id, MAX_INT, mine.signed.body, b"\0" * 64, mine.signed.cert)
    version = me.version
    me.receive(Gossip(rogue.id, states=(forged,)), c.now, peer=rogue.id)
    assert me.version == version
    assert me.counters["rejected-state:bad-signature"] == 1


@pytest.mark.parametrize("count", [300, 1500])
def test_phantom_members_never_enter_a_view(count: int) -> None:
    c, rogue = build("same-cluster")
    m = RogueMachine()
    m.c, m.rogue, m.sent = c, rogue, 0
    m.phantoms(dst=1, count=count, kind=0)
    assert len(c.core(1).members) == HONEST
    # A flood of bad signatures stops being checked after a few.
    assert c.core(1).counters["rejected-state:flood"] == 1
    assert sum(v for k, v in c.core(1).counters.items() if k.startswith("rejected-claim")) <= 8
    c.register(2, "late", "late-2")
    spread = c.run_until_true(lambda: all(c.serves(i, "late", "late-2") for i in c.running()), 5)
    assert spread is not None


def test_documents_of_an_expired_signer_stop_being_served() -> None:
    """Verified while valid, held, then the certificate expires: rechecking drops them."""
    from datetime import UTC, datetime, timedelta

    c, _ = build("same-cluster")
    me = c.core(0)
    assert {rec.instance for _, rec in me.store.endpoints("orders")} == {
        f"orders-{k}" for k in range(HONEST)
    }
    assert me.recheck_signers(c.now) == 0  # no clock yet: nothing expires
    c.verifier.clock = lambda: datetime.now(UTC) + timedelta(days=400)  # past every leaf
    dropped = me.recheck_signers(c.now)
    assert dropped == HONEST - 1  # everyone's but our own (we re-sign ours on renewal)
    assert {rec.instance for _, rec in me.store.endpoints("orders")} == {"orders-0"}
    assert me.counters["rejected-state:expired-cert"] == HONEST - 1


def test_a_peer_cannot_amplify_small_syncs_into_member_lists() -> None:
    """Join requests cost the rogue a few bytes each and us O(n): past a burst,
    it gets fingerprints only, until it slows down."""
    from meshd.protocol.anti_entropy import HEAVY_REPLY_BURST

    c, rogue = build("same-cluster")
    me = c.core(0)
    introduce(me, rogue, c.now)  # a member: its syncs are answered where it listens
    heavy = 0
    for _ in range(50):
        msg = PushPull(rogue.id, source_addr="127.0.0.1:1", join=True)
        me.receive(msg, c.now, peer=rogue.id)
        heavy += sum(
            1 for _, m in me.messages_to_send() if isinstance(m, PushPullReply) and m.members
        )
    assert heavy == HEAVY_REPLY_BURST
    assert me.counters["rejected-state:sync-rate"] == 50 - HEAVY_REPLY_BURST
    c.run_for(3.0)  # the bucket refills: an honest pace is served again
    me.receive(PushPull(rogue.id, source_addr="127.0.0.1:1", join=True), c.now, peer=rogue.id)
    assert any(isinstance(m, PushPullReply) and m.members for _, m in me.messages_to_send())


def introduce(me: Core, rogue: Rogue, now: float, address: str = "127.0.0.1:1") -> None:
    """The rogue's own genuine claim, listening at ``address``: a member to ``me``."""
    own = rogue.signer.sign_claim(MemberClaim(Status.ALIVE, rogue.id, 1, address))
    hello = MemberUpdate(Status.ALIVE, rogue.id, 1, address, by=rogue.id, claim=own)
    me.receive(Gossip(rogue.id, members=(hello,)), now, peer=rogue.id)
    me.messages_to_send()
    assert me.members[rogue.id].address == address


def test_sync_answers_go_where_the_senders_own_claim_says() -> None:
    """A member naming a third agent as the address to answer (``source_addr``)
    does not get our member list sent there, nor anywhere: only the entry we
    hold for it (what a restart at a new address needs), rationed."""
    from meshd.protocol.anti_entropy import UNPLACED

    c, rogue = build("same-cluster")
    me, victim = c.core(0), c.nodes[1].address
    me.set_revocations(1, b"\x30" * 1000, c.now)
    me.messages_to_send()
    introduce(me, rogue, c.now)
    for _ in range(3):
        me.receive(
            PushPull(rogue.id, source_addr=victim, join=True, revocations=0), c.now, peer=rogue.id
        )
        [(addr, reply)] = me.messages_to_send()
        assert addr == victim and isinstance(reply, PushPullReply)
        assert [u.member for u in reply.members] == [rogue.id]
        assert (reply.digest, reply.states, reply.view) == ({}, (), UNPLACED)
    # From its own address it is answered in full.
    me.receive(PushPull(rogue.id, source_addr="127.0.0.1:1", join=True), c.now, peer=rogue.id)
    sent = me.messages_to_send()
    assert any(isinstance(m, PushPullReply) and len(m.members) > 1 for _, m in sent)
    assert {addr for addr, _ in sent} == {"127.0.0.1:1"}


def test_a_stranger_naming_an_address_gets_fingerprints_only() -> None:
    """A sender we cannot place by a claim of its own (no member, no claim in
    the message) is answered where it says, but only with the few bytes of our
    fingerprints: no member list, digest, states or revocation list."""
    c, rogue = build("same-cluster")
    me, victim = c.core(0), c.nodes[1].address
    me.set_revocations(1, b"\x30" * 1000, c.now)
    me.messages_to_send()
    for join in (True, False):
        me.receive(
            PushPull(rogue.id, source_addr=victim, join=join, view=7, revocations=0),
            c.now,
            peer=rogue.id,
        )
        [(addr, reply)] = me.messages_to_send()
        assert addr == victim and isinstance(reply, PushPullReply)
        assert (reply.members, reply.digest, reply.states) == ((), {}, ())
    assert me.counters["rejected-state:unplaced-sync"] == 2
    # Once it is a member, it is answered in full, at its own address.
    introduce(me, rogue, c.now)
    me.receive(PushPull(rogue.id, source_addr="127.0.0.1:1", join=True), c.now, peer=rogue.id)
    sent = me.messages_to_send()
    assert any(isinstance(m, PushPullReply) and m.members for _, m in sent)
    assert {addr for addr, _ in sent} == {"127.0.0.1:1"}


def test_answering_unplaced_draws_one_full_sync_per_sync_we_open() -> None:
    """A member answering every sync of ours with view 0 ("I cannot place
    you") gets our full member list once per sync we open, never again for
    the answer to that full sync, and nothing for answers we never asked."""
    from meshd.protocol.anti_entropy import UNPLACED

    c, rogue = build("same-cluster")
    me = c.core(0)
    introduce(me, rogue, c.now)
    unplaced = PushPullReply(rogue.id, view=UNPLACED)

    def full_syncs() -> int:
        return sum(1 for _, m in me.messages_to_send() if isinstance(m, PushPull) and m.members)

    me.anti_entropy.send_sync("127.0.0.1:1", rogue.id, full=False, dest_cluster=rogue.cluster)
    me.messages_to_send()
    me.receive(unplaced, c.now, peer=rogue.id)
    assert full_syncs() == 1
    me.receive(unplaced, c.now, peer=rogue.id)  # the answer to our full sync
    assert full_syncs() == 0
    for _ in range(20):  # unasked
        me.receive(unplaced, c.now, peer=rogue.id)
    assert full_syncs() == 0


def test_a_member_claiming_another_agents_address_draws_nothing_there() -> None:
    """A member whose signed claim names an honest agent's address: every
    message meant for it (probes, gossip, its syncs' full answers) is dropped
    by the sender's transport, which finds the victim's certificate there,
    and the sender suspects the liar on its own evidence.  The victim
    receives nothing meant for another, and nobody honest is harmed."""
    c, rogue = build("same-cluster")
    victim = 1
    address = c.nodes[victim].address
    others = [i for i in c.running() if i != victim]
    sent_for_rogue: list[str] = []
    transmit = c._transmit

    def spy(hn, pool, addr, msg, to):
        if to == rogue.id:
            sent_for_rogue.append(addr)
        transmit(hn, pool, addr, msg, to)

    c._transmit = spy  # type: ignore[method-assign]
    for i in others:
        introduce(c.core(i), rogue, c.now, address=address)
        # Its sync, answered in full at its own (claimed) address.
        c.inject(i, PushPull(rogue.id, source_addr=address, join=True), as_peer=rogue.id)
    took = c.run_until_true(
        lambda: all(c.core(i).members[rogue.id].status is not Status.ALIVE for i in others), 20
    )
    assert took is not None, "the liar is still alive in an honest view"
    assert sent_for_rogue and set(sent_for_rogue) == {address}
    assert c.misplaced == len(sent_for_rogue)  # every one dropped, none delivered
    assert all(c.core(i).counters["misplaced"] >= 1 for i in others)
    hit = c.core(victim).counters
    assert hit["misdirected"] == 0 and hit["rejected-state:unsolicited"] == 0
    c.run_for(REPAIR_BOUND)
    assert honest_ok(c)


def test_a_misplaced_report_suspects_only_the_member_still_claiming_that_address() -> None:
    """The driver's report (another identity answered at the address) counts
    as our own evidence, as a refused connect does: only for the member whose
    current claim names that address; not for one that has moved since, not
    for ourselves, not for a stranger."""
    c, rogue = build("same-cluster")
    me = c.core(0)
    introduce(me, rogue, c.now, address="127.0.0.1:1")
    me.report_misplaced(rogue.id, "127.0.0.1:2", c.now)  # it moved: no evidence
    me.report_misplaced("east/nobody", "127.0.0.1:1", c.now)
    me.report_misplaced(me.id, me.address, c.now)
    assert me.counters["misplaced"] == 0
    assert me.members[rogue.id].status is Status.ALIVE
    me.report_misplaced(rogue.id, "127.0.0.1:1", c.now)
    assert me.counters["misplaced"] == 1
    assert me.members[rogue.id].status is Status.SUSPECT
    assert me.counters["refused-suspicion"] == 1  # on the short timeout of a refusal


def test_a_claim_for_the_other_pool_does_not_move_a_member() -> None:
    """A bridge's WAN claim (its own signature, another address and incarnation)
    copied into its LAN pool changes nothing there."""
    c, rogue = build("same-cluster")
    victim = c.nodes[1]
    signer = c.nodes[1].signer
    wan = signer.sign_claim(MemberClaim(Status.ALIVE, victim.id, 99, "127.0.0.1:40001", pool="wan"))
    u = MemberUpdate(Status.ALIVE, victim.id, 99, "127.0.0.1:40001", by=victim.id, claim=wan)
    c.core(0).receive(Gossip(rogue.id, members=(u,)), c.now, peer=rogue.id)
    m = c.core(0).members[victim.id]
    assert m.incarnation < 99 and m.address == victim.address
    assert c.core(0).counters["rejected-claim:wrong-pool"] == 1


def test_an_unasked_sync_reply_draws_nothing() -> None:
    """A reply to a sync we never opened, with an empty digest, would have us
    send every state we hold: it is merged like gossip and answered with nothing."""
    c, rogue = build("same-cluster")
    me = c.core(0)
    # The rogue is a member (its own claim is genuine): we know its address.
    own = rogue.signer.sign_claim(MemberClaim(Status.ALIVE, rogue.id, 1, "127.0.0.1:1"))
    hello = MemberUpdate(Status.ALIVE, rogue.id, 1, "127.0.0.1:1", by=rogue.id, claim=own)
    me.receive(Gossip(rogue.id, members=(hello,)), c.now, peer=rogue.id)
    me.messages_to_send()
    assert rogue.id in me.members
    me.receive(PushPullReply(rogue.id, digest={}, view=1), c.now, peer=rogue.id)
    assert me.messages_to_send() == []
    assert me.counters["rejected-state:unsolicited"] == 1


def test_syncs_claiming_no_revocation_list_draw_it_a_rationed_number_of_times() -> None:
    """Our revocation list is up to 256 KiB; a peer's sync saying it holds none
    costs it a few bytes: it gets the list HEAVY_REPLY_BURST times, then slowly."""
    from meshd.protocol.anti_entropy import HEAVY_REPLY_BURST

    c, rogue = build("same-cluster")
    me = c.core(0)
    me.set_revocations(1, b"\x30" * 1000, c.now)
    me.messages_to_send()
    introduce(me, rogue, c.now)  # a stranger is offered no list at all
    sent = 0
    for _ in range(50):
        # Fingerprints that agree: no member list or states, only the offer.
        msg = PushPull(
            rogue.id, source_addr="127.0.0.1:1", records=me.store.fingerprint, view=me.view
        )
        me.receive(msg, c.now, peer=rogue.id)
        sent += sum(1 for _, m in me.messages_to_send() if isinstance(m, Revocations))
    assert sent == HEAVY_REPLY_BURST


def test_pushed_revocation_lists_are_checked_a_rationed_number_of_times() -> None:
    """Checking a list costs a signature verification; a peer pushing junk lists
    gets HEAVY_REPLY_BURST checks, then none until it slows down."""
    from meshd.protocol.anti_entropy import HEAVY_REPLY_BURST

    c, rogue = build("same-cluster")
    me = c.core(0)
    checked: list[bytes] = []

    def check(crl: bytes) -> int | None:
        checked.append(crl)
        return None  # junk: never adopted

    me.revocation_check = check
    for k in range(50):
        me.receive(Revocations(rogue.id, crl=b"junk%d" % k), c.now, peer=rogue.id)
    assert len(checked) == HEAVY_REPLY_BURST
    assert me.revocation_number == 0
