"""Several clusters in the harness: bridges, export control, reach, cross-cluster failover.

Topology of the small tests (``build``): clusters east (4 nodes, bridge n0),
west (4 nodes, bridges n0 and n1) and central (3 nodes, bridge n0), each its
own region with zones alternating ``<c>-a`` / ``<c>-b``.  LAN pools run the
LAN profile; the WAN pool runs the WAN profile with a 1 s probe interval and
a smaller suspicion multiplier, so virtual time stays short while the WAN
code path (its own config, its own core in every bridge) is the one tested.

Each test asserts on what nodes observe: the documents in their stores (WAN
stores of bridges included), the answers of their lookups, and the counters
of refused states.  Every time limit is a bound with a stated derivation
(``meshd.testing``: ``cross_cluster_bound`` and friends, built from
``meshd.protocol.bounds``).
"""

from __future__ import annotations

import hashlib

import msgpack
import pytest

from meshd.policy.policy import AppPolicy
from meshd.policy.resolve import Gateway
from meshd.protocol import bridge as bridge_module
from meshd.protocol.bounds import detection_bound, refused_suspicion_timeout
from meshd.protocol.config import Config
from meshd.protocol.core import Core
from meshd.protocol.store import Entry
from meshd.testing import (
    Cluster,
    all_reachable,
    bridge_indices,
    converged_everywhere,
    cross_cluster_bound,
    cross_cluster_failover,
    cross_cluster_repair_bound,
    cross_cluster_spread_bound,
    cut_off_side_bound,
    heal_bound,
    heal_time,
    inject_wan,
    isolation_time,
    misplaced,
    multi_cluster,
    reach_of,
    unreachable_bound,
)
from meshd.wire import AppRecord, Gossip, OriginState, SignedState, Status, WireError

LAN = Config.lan()
WAN = Config.wan(probe_interval=1.0, probe_timeout=0.5, suspicion_mult=4)
CLUSTERS = ("east", "west", "central")
SIZES = {"east": 4, "west": 4, "central": 3}
BRIDGES = {"east": 1, "west": 2, "central": 1}
N_WAN = sum(BRIDGES.values())
#: Joining from a cold start: every pool syncs with its seed at once, then
#: spreads; a generous fixed allowance, the bounds below start after it.
JOIN_TIMEOUT = 60.0


def build(
    seed: int = 1, *, encode: bool = True, gateways=None, apps: bool = True, config=LAN
) -> tuple[Cluster, dict[str, list[int]]]:
    """East, west, central joined and converged; ``orders`` in east and west."""
    c, g = multi_cluster(
        CLUSTERS,
        SIZES,
        bridges=BRIDGES,
        seed=seed,
        config=config,
        wan_config=WAN,
        gateways=gateways,
        encode=encode,
    )
    assert c.run_until_true(lambda: converged_everywhere(c), JOIN_TIMEOUT) is not None
    # Bridges republish their RTT statements while Vivaldi coordinates settle
    # after the join; the bounds below are for one new document, so start
    # once every version has held still for a few seconds.
    assert c.run_until_true(_quiet(c, 3.0), JOIN_TIMEOUT) is not None
    for i, alive in zip(c.running(), c.alive_counts(), strict=True):
        assert alive == SIZES[c.nodes[i].cluster]
    if apps:
        c.register(g["east"][2], "orders", "orders-east")
        c.register(g["west"][2], "orders", "orders-west")
        settle(c)
    return c, g


def _quiet(c, hold: float):
    """A predicate: converged, and no node's version has moved for ``hold`` seconds."""
    last = {"versions": None, "since": c.now}

    def check() -> bool:
        versions = [c.core(i).version for i in c.running()]
        if versions != last["versions"] or not converged_everywhere(c):
            last["versions"], last["since"] = versions, c.now
        return c.now - last["since"] >= hold

    return check


def settle(c, origin="east", asker="west"):
    """Wait for the documents just published to be everywhere they may be."""
    bound = cross_cluster_spread_bound(SIZES[origin], N_WAN, SIZES[asker], LAN, WAN)
    took = c.run_until_true(lambda: converged_everywhere(c), bound)
    assert took is not None, f"not converged within {bound:.1f} s: {misplaced(c)[:5]}"
    return took


def node(c, g, cluster, k):
    return g[cluster][k]


def held(node: Core, origin: str) -> Entry:
    """The entry ``node`` holds for ``origin``; the test fails when it holds none."""
    entry = node.store.get(origin)
    assert entry is not None, f"{node.id} holds nothing from {origin}"
    return entry


def instances(answers):
    return [a.instance for a in answers]


def all_nodes(g, *clusters):
    return [i for cl in clusters or CLUSTERS for i in g[cl]]


# ---------------------------------------------------------------------------
# The topology itself


def test_multi_cluster_builds_regions_zones_bridges_and_one_wan_pool():
    c, g = multi_cluster(["a", "b"], 3, bridges={"b": 2}, seed=3, encode=False)
    assert g == {"a": [0, 1, 2], "b": [3, 4, 5]}
    assert [c.nodes[i].id for i in g["b"]] == ["b/n0", "b/n1", "b/n2"]
    assert {c.nodes[i].region for i in g["a"]} == {"r-a"}
    assert [c.nodes[i].zone for i in g["b"]] == ["b-a", "b-b", "b-a"]
    assert bridge_indices(c) == [0, 3, 4]
    assert c.run_until_true(lambda: converged_everywhere(c), JOIN_TIMEOUT) is not None
    c.run_for(10)
    for b in bridge_indices(c):
        assert sorted(m.id for m in c.wan(b).members.values() if m.serving) == [
            "a/n0",
            "b/n0",
            "b/n1",
        ]
    with pytest.raises(ValueError):
        multi_cluster(["a"], 2, bridges={"a": 3})
    with pytest.raises(ValueError):
        multi_cluster(["a"], 2, gateways={"z": "gw:1"})
    with pytest.raises(ValueError):
        multi_cluster(["a", "b"], {"a": 2})


# ---------------------------------------------------------------------------
# Documents cross clusters through the bridges, and only where exported


def test_records_reach_exactly_the_clusters_they_are_exported_to():
    c, g = build(seed=2, apps=False)
    e2, e3 = node(c, g, "east", 2), node(c, g, "east", 3)
    c.register(e2, "orders", "orders-east")  # export to all
    c.register(e3, "ledger", "ledger-east", export=("west",))  # to a list
    c.register(e3, "vault", "vault-east", export=())  # to none
    settle(c)

    to_west, local = "east/n3#to:west", "east/n3#local"
    for i in all_nodes(g):
        hn = c.nodes[i]
        store = c.core(i).store
        assert "east/n2" in store and "east/n3" in store  # main documents go everywhere
        assert (to_west in store) == (hn.cluster in ("east", "west")), hn.id
        assert (local in store) == (hn.cluster == "east"), hn.id
        if hn.is_bridge:
            wan = c.wan(i).store
            # Absent, not hidden: central's bridge never even held it.
            assert (to_west in wan) == (hn.cluster != "central"), hn.id
            assert local not in wan, hn.id  # local documents never enter the WAN pool
    # Never relayed into central at all: nothing had to be refused there.
    for i in g["central"]:
        cores = c.nodes[i].cores.values()
        assert all(core.counters["rejected-state:not-exported"] == 0 for core in cores)

    w3, c1 = node(c, g, "west", 3), node(c, g, "central", 1)
    assert instances(c.resolve(w3, "ledger")) == ["ledger-east"]
    assert c.resolve(c1, "ledger", include_unhealthy=True) == []
    assert c.resolve(w3, "vault", include_unhealthy=True) == []
    assert instances(c.resolve(node(c, g, "east", 1), "vault")) == ["vault-east"]
    assert instances(c.resolve(c1, "orders")) == ["orders-east"]


# ---------------------------------------------------------------------------
# Lookups: own cluster first, then the failover list


def test_east_answers_east_first_and_central_follows_its_failover_list():
    c, g = build(seed=3)
    for k in (0, 1, 3):
        answers = c.resolve(node(c, g, "east", k), "orders")
        assert instances(answers) == ["orders-east", "orders-west"]
        first, second = answers
        assert first.tier in ("node", "zone", "region", "cluster") and first.active
        assert first.reachable and first.gateway is None
        assert second.tier == "any" and not second.active
    assert c.resolve(node(c, g, "east", 0), "orders")[0].tier == "zone"  # east-a, like n2
    assert c.resolve(node(c, g, "east", 1), "orders")[0].tier == "region"
    assert instances(c.resolve(node(c, g, "west", 3), "orders")) == ["orders-west", "orders-east"]

    c1 = node(c, g, "central", 1)
    for failover in (("west", "east"), ("east", "west")):
        answers = c.resolve(c1, "orders", policy=AppPolicy(failover=failover))
        assert [a.cluster for a in answers] == list(failover)
        assert [a.tier for a in answers] == ["failover", "failover"]
        assert [a.active for a in answers] == [True, False]
    both = c.resolve(c1, "orders", policy=AppPolicy(failover=("west", "east"), min_healthy=2))
    assert [a.active for a in both] == [True, True]
    # Only the clusters on the list when "any" is not among the tiers.
    only = AppPolicy(tiers=("zone", "region", "cluster", "failover"), failover=("west",))
    assert instances(c.resolve(c1, "orders", policy=only)) == ["orders-west"]


# ---------------------------------------------------------------------------
# Liveness crosses clusters: a dead node of east stops being served elsewhere


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_dead_instance_node_in_east_fails_over_to_west_within_the_bound(seed):
    c, g = build(seed=seed)
    victim = node(c, g, "east", 2)
    east_askers = [i for i in g["east"] if i != victim]
    askers = east_askers + g["central"]
    policy = AppPolicy(failover=("east", "west"))
    took = cross_cluster_failover(
        c, victim, "orders", askers, to_cluster="west", policy=policy, timeout=300
    )
    assert took is not None, "some asker still used the dead east copy after 300 s"
    inside = detection_bound(SIZES["east"], LAN)
    across = cross_cluster_bound(SIZES["east"], N_WAN, SIZES["central"], LAN, WAN)
    # A crash is refused to its peers' connects: held dead no sooner than that allows.
    floor = refused_suspicion_timeout(LAN)
    for i, t in took.items():
        assert floor <= t, f"{c.nodes[i].id} failed over before anyone could hold it dead"
        assert t <= (inside if i in east_askers else across), (c.nodes[i].id, t)

    for i in askers:
        answers = c.resolve(i, "orders", policy=policy, include_unhealthy=True)
        assert instances(answers) == ["orders-west"]
        assert answers[0].active and answers[0].tier in ("failover", "any")

    # West's own lookups stop showing it too (within the same bound), though
    # west still holds the document: east's bridge says its owner is down,
    # signed by east, and west tombstoned it.
    def west_sees_it():
        return any(
            a.member == "east/n2"
            for i in g["west"]
            for a in c.resolve(i, "orders", include_unhealthy=True)
        )

    assert c.run_until_true(lambda: not west_sees_it(), across) is not None
    for i in g["west"]:
        assert "east/n2" not in [a.member for a in c.resolve(i, "orders", include_unhealthy=True)]
        assert "east/n2" in c.core(i).store
        down = held(c.core(i), "east/n0").state.down
        assert [member for member, _ in down] == ["east/n2"]
        assert down[0][1] == c.core(i).store.version("east/n2")  # dead as of its last version
        assert reach_of(c, i).down == {"east/n2"}


def test_restarted_instance_node_is_served_everywhere_again():
    c, g = build(seed=11)
    victim = node(c, g, "east", 2)
    policy = AppPolicy(failover=("east", "west"))
    askers = g["central"] + [node(c, g, "east", 1)]
    assert cross_cluster_failover(c, victim, "orders", askers, policy=policy) is not None
    c.restart(victim)
    bound = cross_cluster_repair_bound(SIZES["east"], N_WAN, SIZES["central"], LAN, WAN)
    back = c.run_until_true(
        lambda: all(
            c.resolve(i, "orders", policy=policy)[0].instance == "orders-east" for i in askers
        ),
        bound,
    )
    assert back is not None
    # The askers serve it again; the bridge's statement that it was down is
    # withdrawn everywhere else within the same bound (clusters that never
    # asked may hear it a moment later).
    cleared = c.run_until_true(
        lambda: all(reach_of(c, i).down == frozenset() for i in c.running()), bound
    )
    assert cleared is not None


# ---------------------------------------------------------------------------
# Known bugs: a dead node's documents outlive what the bridges say about it.
#
# A bridge derives ``down`` from its LAN member table (Bridge.down_members).
# Foreign copies of a node's documents (in WAN stores and in other clusters'
# LAN stores) are never tombstoned or reaped: only ``down`` hides them.  So
# whenever the table of a cluster's bridge forgets a dead member, the dead
# member's records come back, active, everywhere else.


def _crash_east_instance_and_fail_over(c, g, policy):
    askers = g["central"] + [node(c, g, "east", 1)]
    took = cross_cluster_failover(c, node(c, g, "east", 2), "orders", askers, policy=policy)
    assert took is not None
    return askers


def _serving_dead_east_n2(c):
    return sorted(
        c.nodes[i].id
        for i in c.running()
        if any(a.member == "east/n2" for a in c.resolve(i, "orders", include_unhealthy=True))
    )


# Three ways a dead node's records once came back (found by these tests): a
# bridge now states "dead as of version v", every store tombstones up to v and
# keeps that even when the statement is later dropped, and bridges never take
# their own cluster's documents from the WAN pool.


def test_dead_node_stays_unserved_elsewhere_after_its_tombstone_is_reaped():
    lan = Config.lan(tombstone_timeout=120.0)
    c, g = build(seed=12, config=lan)
    policy = AppPolicy(failover=("east", "west"))
    _crash_east_instance_and_fail_over(c, g, policy)
    c.run_for(lan.tombstone_timeout + 60)  # east reaps east/n2
    assert all("east/n2" not in c.core(i).members for i in g["east"] if i in c.running())
    assert _serving_dead_east_n2(c) == []
    # Any membership change in east makes its bridge restate.
    c.add_node(cluster="east", name="n4", region="r-east", zone="east-a")
    c.run_for(cross_cluster_repair_bound(5, N_WAN, SIZES["central"], lan, WAN))
    assert _serving_dead_east_n2(c) == []


def test_dead_node_stays_unserved_after_the_only_bridge_of_its_cluster_restarts():
    c, g = build(seed=13)
    policy = AppPolicy(failover=("east", "west"))
    _crash_east_instance_and_fail_over(c, g, policy)
    bridge = node(c, g, "east", 0)
    c.crash(bridge)
    c.run_for(5)
    c.restart(bridge)
    bound = cross_cluster_repair_bound(SIZES["east"], N_WAN, SIZES["central"], LAN, WAN)
    assert c.run_until_true(lambda: all_reachable(c), bound) is not None
    c.run_for(detection_bound(SIZES["east"], LAN))  # time to re-learn the death, if it could
    assert _serving_dead_east_n2(c) == []


def test_reaped_member_is_not_resurrected_in_its_own_cluster_by_the_wan_pool():
    lan = Config.lan(tombstone_timeout=120.0)
    c, g = build(seed=14, config=lan)
    policy = AppPolicy(failover=("east", "west"))
    _crash_east_instance_and_fail_over(c, g, policy)
    c.run_for(lan.tombstone_timeout + 60)
    inside = [node(c, g, "east", k) for k in (1, 3)]
    assert all("east/n2" not in c.core(i).store for i in inside)  # reaped for good
    bridge = node(c, g, "east", 0)
    c.crash(bridge)
    c.run_for(5)
    c.restart(bridge)
    c.run_for(cross_cluster_repair_bound(SIZES["east"], N_WAN, SIZES["east"], lan, WAN))
    for i in inside:
        assert not c.serves(i, "orders", "orders-east"), c.nodes[i].id


# ---------------------------------------------------------------------------
# Bridges failing


def test_killing_one_of_two_west_bridges_loses_nothing_and_marks_nothing_unreachable():
    c, g = build(seed=4)
    c.register(node(c, g, "central", 2), "billing", "billing-central")
    settle(c, "central", "east")
    marked = []

    def watch(i, e, now):
        if reach_of(c, i).unreachable:
            marked.append((c.nodes[i].id, sorted(reach_of(c, i).unreachable), now))

    c.observers.append(watch)
    dead_bridge = node(c, g, "west", 0)  # the WAN pool's seed, too
    c.crash(dead_bridge)
    window = detection_bound(SIZES["west"], LAN) + detection_bound(N_WAN, WAN)
    c.run_for(window)
    assert marked == []
    for i in c.running():
        if c.nodes[i].cluster != "west":
            assert reach_of(c, i).down == {"west/n0"}  # west/n1 says so, signed by west
        for app in ("orders", "billing"):
            everything = c.resolve(i, app, include_unhealthy=True)
            assert everything == c.resolve(i, app)  # all healthy and reachable
            assert len(everything) == (2 if app == "orders" else 1)

    # And the remaining bridge carries new documents both ways.
    c.register(node(c, g, "east", 3), "late", "late-east")
    c.register(node(c, g, "west", 3), "late", "late-west")
    bound = cross_cluster_spread_bound(SIZES["east"], N_WAN - 1, SIZES["west"], LAN, WAN)
    assert c.run_until_true(lambda: converged_everywhere(c), bound) is not None
    assert marked == []
    for i in c.running():
        assert sorted(instances(c.resolve(i, "late"))) == ["late-east", "late-west"]


def test_killing_the_only_bridge_of_east_marks_it_unreachable_until_it_restarts():
    c, g = build(seed=5)
    bridge, e1 = node(c, g, "east", 0), node(c, g, "east", 1)
    outside = all_nodes(g, "west", "central")

    def east_unreachable_outside():
        return all(not reach_of(c, i).reachable("east") for i in outside)

    c.crash(bridge)
    bound = unreachable_bound(N_WAN, max(SIZES.values()), LAN, WAN)
    assert c.run_until_true(east_unreachable_outside, bound) is not None
    for i in outside:
        everything = c.resolve(i, "orders", include_unhealthy=True)
        east = [a for a in everything if a.cluster == "east"]
        assert len(east) == 1 and not east[0].reachable and not east[0].active
        assert "orders-east" not in instances(c.resolve(i, "orders"))
        assert instances(c.resolve(i, "orders")) == ["orders-west"]
    # Inside east, with no bridge of its own left, every other cluster is cut off.
    inside = detection_bound(SIZES["east"], LAN)
    assert (
        c.run_until_true(
            lambda: all(reach_of(c, i).unreachable == {"west", "central"} for i in g["east"][1:]),
            inside,
        )
        is not None
    )
    answers = c.resolve(e1, "orders", include_unhealthy=True)
    assert [(a.instance, a.reachable, a.active) for a in answers] == [
        ("orders-east", True, True),
        ("orders-west", False, False),
    ]

    # Published while east is cut off; it comes over by anti-entropy afterwards.
    c.register(node(c, g, "east", 3), "late", "late-east")
    c.run_for(30)
    assert not any(c.serves(i, "late", "late-east") for i in outside)
    c.restart(bridge)
    bound = cross_cluster_repair_bound(SIZES["east"], N_WAN, SIZES["west"], LAN, WAN)
    back = c.run_until_true(lambda: all_reachable(c) and converged_everywhere(c), bound)
    assert back is not None, misplaced(c)[:5]
    for i in c.running():
        assert instances(c.resolve(i, "late")) == ["late-east"]
        assert all(a.reachable for a in c.resolve(i, "orders", include_unhealthy=True))


def test_lost_cluster_is_marked_unreachable_both_ways_and_converges_after_heal():
    c, g = build(seed=6)
    c2 = node(c, g, "central", 2)
    c.register(c2, "billing", "billing-central", port=7000)
    settle(c, "central", "west")
    took = isolation_time(c, "central", timeout=600)
    assert took is not None
    outside_bound = unreachable_bound(N_WAN, max(SIZES.values()), LAN, WAN)
    inside_bound = cut_off_side_bound(N_WAN, SIZES["central"], LAN, WAN)
    for i, t in took.items():
        inside = c.nodes[i].cluster == "central"
        assert t <= (inside_bound if inside else outside_bound), (c.nodes[i].id, t)

    w3 = node(c, g, "west", 3)
    billing = c.resolve(w3, "billing", include_unhealthy=True)
    assert [(a.instance, a.reachable, a.active) for a in billing] == [
        ("billing-central", False, False)
    ]
    assert c.resolve(w3, "billing") == []
    everything = c.resolve(c2, "orders", include_unhealthy=True)
    assert {a.cluster for a in everything} == {"east", "west"}
    assert not any(a.reachable for a in everything)
    assert c.resolve(c2, "orders") == []

    # Changes on both sides while cut off.
    c.register(c2, "billing", "billing-central", port=7001)
    c.register(node(c, g, "east", 3), "late", "late-east")
    c.run_for(60)
    assert [a.port for a in c.resolve(w3, "billing", include_unhealthy=True)] == [7000]
    bound = heal_bound(SIZES["central"], N_WAN, SIZES["west"], LAN, WAN)
    healed = heal_time(c, timeout=bound)
    assert healed is not None, misplaced(c)[:5]
    for i in c.running():
        assert [a.port for a in c.resolve(i, "billing")] == [7001]
        assert instances(c.resolve(i, "late")) == ["late-east"]
    digests = {
        cl: {tuple(sorted(c.core(i).store.digest().items())) for i in g[cl]} for cl in CLUSTERS
    }
    assert all(len(d) == 1 for d in digests.values())  # each cluster's stores agree


# ---------------------------------------------------------------------------
# Gateways


def test_cluster_behind_a_gateway_is_answered_with_the_gateway_and_sni_name():
    c, g = build(seed=7, gateways={"central": "gw.central.example:8443"})
    c2 = node(c, g, "central", 2)
    c.register(c2, "payments", "pay-1", port=9000)
    c.register(c2, "payments", "Pay_2", port=9001)
    settle(c, "central", "west")
    w3 = node(c, g, "west", 3)
    answers = c.resolve(w3, "payments", policy=AppPolicy(min_healthy=2))
    assert len(answers) == 2
    by_instance = {a.instance: a for a in answers}
    hashed = "x--" + hashlib.blake2b(b"Pay_2", digest_size=16).hexdigest()
    assert by_instance["pay-1"].gateway == Gateway(
        "gw.central.example", 8443, "pay-1.payments.default.central.mesh.local"
    )
    assert by_instance["Pay_2"].gateway == Gateway(
        "gw.central.example", 8443, f"{hashed}.payments.default.central.mesh.local"
    )
    for a in answers:
        assert (a.address, a.port) == ("gw.central.example", 8443)
    # The records themselves are unchanged: only the answer dials the gateway.
    held = [rec for _, rec in c.core(w3).store.endpoints("payments")]
    assert {(r.address, r.port) for r in held} == {("127.0.0.1", 9000), ("127.0.0.1", 9001)}
    # Inside central: direct.  And east, which has no gateway, is direct from central.
    inside = c.resolve(node(c, g, "central", 1), "payments", policy=AppPolicy(min_healthy=2))
    assert {(a.address, a.port, a.gateway) for a in inside} == {
        ("127.0.0.1", 9000, None),
        ("127.0.0.1", 9001, None),
    }
    east = c.resolve(node(c, g, "central", 1), "orders")
    assert east and all(a.gateway is None and a.address == "127.0.0.1" for a in east)


# ---------------------------------------------------------------------------
# Relays cannot forge


def _signed_by(c, i, body, origin, version):
    hn = c.nodes[i]
    return SignedState(
        origin, version, body, hn.signer.node_cert.key.sign(body), hn.signer.node_cert.cert_der
    )


def test_origin_state_refuses_to_list_down_members_of_another_cluster():
    with pytest.raises(WireError, match="own cluster"):
        OriginState("n0", "west", "r-west", "west-a", 1, bridge=True, down=(("east/n2", 1),))
    OriginState("n0", "west", "r-west", "west-a", 1, bridge=True, down=(("west/n3", 1),))


def test_a_west_bridge_cannot_mark_an_east_node_down():
    c, g = build(seed=8)
    w0, c0, c1 = node(c, g, "west", 0), node(c, g, "central", 0), node(c, g, "central", 1)
    # 1. West's own main document, hand-encoded to list an east node as down.
    ver = c.core(w0).version + 100
    body = msgpack.packb(
        {
            "n": "n0",
            "c": "west",
            "r": "r-west",
            "z": "west-a",
            "ver": ver,
            "a": [],
            "b": True,
            "dn": ["east/n2"],
        },
        use_bin_type=True,
    )
    own = _signed_by(c, w0, body, "west/n0", ver)
    # 2. A document claiming to be east's bridge, signed with west's certificate.
    claim = OriginState(
        "n0",
        "east",
        "r-east",
        "east-a",
        c.core(0).version + 100,
        bridge=True,
        down=(("east/n2", 1),),
    )
    as_east = _signed_by(c, w0, claim.encode(), claim.origin, claim.version)
    # Through the WAN pool into central's bridge, and inside central.
    inject_wan(c, c0, Gossip(c.nodes[w0].id, states=(own, as_east)), src=w0)
    c.inject(c1, Gossip(c.nodes[c0].id, states=(own, as_east)), src=c0)
    c.run_for(10)
    for counters in (c.wan(c0).counters, c.core(c1).counters):
        assert counters["rejected-state:malformed"] == 1
        assert counters["rejected-state:cluster-mismatch"] == 1
    for i in c.running():
        assert reach_of(c, i).down == frozenset()
        assert held(c.core(i), "west/n0").signed.version < ver
        assert held(c.core(i), "east/n0").signed.version < claim.version
        assert "orders-east" in instances(c.resolve(i, "orders"))


def test_a_relay_that_alters_an_east_document_is_rejected_and_counted():
    c, g = build(seed=9)
    w0, w2, w3 = (node(c, g, "west", k) for k in (0, 2, 3))
    c0 = node(c, g, "central", 0)
    genuine = held(c.core(w3), "east/n2").signed
    state = OriginState.decode(genuine.body)
    rec = state.apps[0]
    altered = OriginState(
        state.node,
        state.cluster,
        state.region,
        state.zone,
        state.version + 1,
        (AppRecord(rec.app, rec.instance, rec.address, 6666),),
    )
    forged = SignedState(
        genuine.origin, altered.version, altered.encode(), genuine.signature, genuine.cert
    )
    c.inject(w3, Gossip(c.nodes[w2].id, states=(forged,)), src=w2)  # a relay inside west
    inject_wan(c, w0, Gossip(c.nodes[c0].id, states=(forged,)), src=c0)  # a relay on the WAN
    c.run_for(10)
    assert c.core(w3).counters["rejected-state:bad-signature"] == 1
    assert c.wan(w0).counters["rejected-state:bad-signature"] == 1
    assert c.wan(w0).store.version("east/n2") == genuine.version
    for i in c.running():
        assert c.core(i).store.version("east/n2") == genuine.version
        assert [a.port for a in c.resolve(i, "orders") if a.cluster == "east"] == [8080]


def test_a_document_not_exported_to_central_is_refused_there():
    c, g = build(seed=10, apps=False)
    c.register(node(c, g, "east", 3), "ledger", "ledger-east", export=("west",))
    settle(c)
    w0, c0, c1, c2 = node(c, g, "west", 0), *g["central"]
    doc = held(c.core(node(c, g, "west", 3)), "east/n3#to:west").signed
    c.inject(c1, Gossip(c.nodes[c2].id, states=(doc,)), src=c2)
    inject_wan(c, c0, Gossip(c.nodes[w0].id, states=(doc,)), src=w0)
    c.run_for(10)
    assert c.core(c1).counters["rejected-state:not-exported"] == 1
    assert c.wan(c0).counters["rejected-state:not-exported"] == 1
    for i in g["central"]:
        assert "east/n3#to:west" not in c.core(i).store
        assert c.resolve(i, "ledger", include_unhealthy=True) == []
    assert "east/n3#to:west" not in c.wan(c0).store


# ---------------------------------------------------------------------------
# Larger: 5 clusters x 20 nodes


@pytest.mark.slow
def test_five_clusters_of_twenty_converge_and_fail_over_within_the_bounds():
    names = ["c0", "c1", "c2", "c3", "c4"]
    n = 20
    c, g = multi_cluster(
        names, n, bridges={"c1": 2}, seed=21, config=LAN, wan_config=WAN, encode=False
    )
    n_wan = len(names) + 1
    assert c.run_until_true(lambda: converged_everywhere(c), JOIN_TIMEOUT) is not None
    host = {x: g[x][2] for x in names}
    c.register(host["c0"], "orders", "orders-c0")
    c.register(host["c1"], "orders", "orders-c1")
    for k, x in enumerate(names):
        c.register(host[x], "ledger", f"ledger-{x}", export=(names[(k + 1) % len(names)],))
    bound = cross_cluster_spread_bound(n, n_wan, n, LAN, WAN)
    assert c.run_until_true(lambda: converged_everywhere(c), bound) is not None
    assert instances(c.resolve(g["c3"][5], "ledger")) == ["ledger-c3", "ledger-c2"]

    policy = AppPolicy(failover=("c0", "c1"))
    own = [i for i in g["c0"] if i != host["c0"]]
    far = [i for x in names[2:] for i in g[x]]
    took = cross_cluster_failover(
        c, host["c0"], "orders", own + far, to_cluster="c1", policy=policy, timeout=300
    )
    assert took is not None
    assert max(took[i] for i in own) <= detection_bound(n, LAN)
    assert max(took[i] for i in far) <= cross_cluster_bound(n, n_wan, n, LAN, WAN)

    cut = isolation_time(c, "c4", timeout=600)
    assert cut is not None
    outside = [t for i, t in cut.items() if c.nodes[i].cluster != "c4"]
    inside = [t for i, t in cut.items() if c.nodes[i].cluster == "c4"]
    assert max(outside) <= unreachable_bound(n_wan, n, LAN, WAN)
    assert max(inside) <= cut_off_side_bound(n_wan, n, LAN, WAN)
    c.register(host["c4"], "orders", "orders-c4")  # published while cut off
    assert heal_time(c, timeout=heal_bound(n, n_wan, n, LAN, WAN)) is not None
    assert instances(c.resolve(g["c2"][7], "orders", policy=policy)) == ["orders-c1", "orders-c4"]


# ---------------------------------------------------------------------------
# Round trips: Vivaldi coordinates from probes, the nearest other cluster first


def test_nearest_other_cluster_and_rtt_order_come_from_measured_round_trips():
    # central is 5 ms from west and 60 ms from east; inside west, w3 sits 20 ms
    # away from the others (a far rack).  Nothing tells the nodes this but the
    # round trips of their own probes.
    one_way = {
        frozenset({"central", "west"}): 0.0025,
        frozenset({"central", "east"}): 0.030,
        frozenset({"east", "west"}): 0.030,
    }
    c = Cluster(0, seed=21, wan_config=WAN, encode=False)
    far = set()

    def latency(src, dst, rng):
        a, b = c.nodes[src], c.nodes[dst]
        base = one_way.get(frozenset({a.cluster, b.cluster}), 0.0005)
        if a.cluster == b.cluster and (src in far) != (dst in far):
            base = 0.010
        return base * rng.uniform(0.95, 1.05)

    c.latency = latency
    ids = {}
    for cluster in ("east", "west", "central"):
        for k in range(4):
            hn = c.add_node(
                cluster=cluster, name=f"{cluster[0]}{k}", bridge=k == 0,
                region=f"r-{cluster}", zone=f"{cluster}-z{k}",
            )  # fmt: skip
            ids[hn.name] = hn.index
    far.add(ids["w3"])
    c.register(ids["e1"], "orders", "orders-east")
    c.register(ids["w1"], "orders", "orders-west")
    c.register(ids["w2"], "cache", "cache-near")
    c.register(ids["w3"], "cache", "cache-far")
    c.run_for(120)  # enough probes for the coordinates to settle

    # The central bridge states round trips per cluster; every central node has them.
    stated = dict(held(c.core(ids["c0"]), "central/c0").state.rtt)
    assert set(stated) == {"east", "west"}
    assert stated["west"] < stated["east"]
    rtt = reach_of(c, ids["c2"]).rtt
    assert 0.002 < rtt["west"] < 0.02 < rtt["east"] < 0.2
    # No failover list: "any" orders the other clusters nearest first.
    answers = c.resolve(ids["c2"], "orders")
    assert [a.cluster for a in answers] == ["west", "east"]
    assert [a.active for a in answers] == [True, False]
    # order = "rtt" inside a tier: w1 measures w2 near and w3 far.
    core = c.core(ids["w1"])
    to_w2, to_w3 = core.estimated_rtt("west/w2"), core.estimated_rtt("west/w3")
    assert to_w2 is not None and to_w3 is not None
    assert to_w2 < 0.005 < to_w3
    by_rtt = AppPolicy(tiers=("region", "any"), order="rtt")
    assert instances(c.resolve(ids["w1"], "cache", policy=by_rtt)) == ["cache-near", "cache-far"]


def test_a_down_statement_is_capped_to_the_most_recent_deaths(monkeypatch):
    monkeypatch.setattr(bridge_module, "MAX_DOWN_STATEMENT", 1)
    c, g = build(seed=5, apps=False)
    b = node(c, g, "east", 0)
    first, second = node(c, g, "east", 1), node(c, g, "east", 2)
    c.crash(first)
    assert c.run_until_true(lambda: c.status_of(b, first) is Status.DEAD, 120.0) is not None
    c.crash(second)
    assert c.run_until_true(lambda: c.status_of(b, second) is Status.DEAD, 120.0) is not None
    c.run_for(10.0)  # past a bridge refresh
    stated = held(c.core(b), c.nodes[b].id).state.down
    assert [mid for mid, _ in stated] == [c.nodes[second].id]  # the most recent only
