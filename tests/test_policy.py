"""meshd.policy.policy: the policy file, and which endpoints a lookup returns in what order."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.policy.locality import TIER_RANK, TIERS, Topology, tier_of
from meshd.policy.policy import (
    AppPolicy,
    Candidate,
    Policy,
    PolicyError,
    Ranked,
    fold_tier,
    hrw_score,
    load_policy_file,
    parse_policy,
    policy_to_dict,
    select,
)

PROPS = settings(max_examples=300, deadline=None, derandomize=True)

ASKER = Topology(node="n1", cluster="east", region="us-east", zone="us-east-1a")


def cand(
    instance: str, node: str, cluster: str, region: str = "", zone: str = "", **kw
) -> Candidate:
    return Candidate(
        instance=instance,
        app="orders",
        namespace="default",
        address="192.0.2.1",
        port=3500,
        node=node,
        cluster=cluster,
        region=region,
        zone=zone,
        **kw,
    )


# One copy per place, as seen from ASKER (east, us-east-1a, node n1).
SAME_NODE = cand("o-node", "n1", "east", "us-east", "us-east-1a")
SAME_ZONE = cand("o-zone", "n2", "east", "us-east", "us-east-1a")
SAME_REGION = cand("o-region", "n3", "east", "us-east", "us-east-1b")
SAME_CLUSTER = cand("o-cluster", "n4", "east", "eu-west", "eu-west-1a")
WEST = cand("o-west", "w1", "west", "us-west", "us-west-1a")
CENTRAL = cand("o-central", "c1", "central", "us-central", "us-central-1a")
SOUTH = cand("o-south", "s1", "south", "sa-east", "sa-east-1a")
ALL_PLACES = [SAME_NODE, SAME_ZONE, SAME_REGION, SAME_CLUSTER, WEST, CENTRAL, SOUTH]


def instances(ranked: list[Ranked]) -> list[str]:
    return [r.candidate.instance for r in ranked]


def active(ranked: list[Ranked]) -> list[str]:
    return [r.candidate.instance for r in ranked if r.active]


def down(c: Candidate) -> Candidate:
    return replace(c, health="critical")


# ---------------------------------------------------------------------------
# Parsing


def test_empty_policy_is_the_default():
    p = parse_policy({})
    assert p == Policy(AppPolicy(), {})
    assert p.default.tiers == TIERS
    assert p.default.min_healthy == 1
    assert p.default.allow is None


POLICY_TOML = """
tiers = ["node", "zone", "region", "cluster", "failover", "any"]
failover = ["west", "central"]
min_healthy = 2
order = "weight"

[apps."orders"]
min_healthy = 3
min_healthy_fraction = 0.5

[apps."payments/orders"]
order = "rtt"
allow = ["east", "west"]

[apps.billing]
tiers = ["node", "cluster"]
nearest_first = false
"""


def test_load_file_and_per_app_inheritance(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY_TOML)
    p = load_policy_file(path)
    assert p.default == AppPolicy(failover=("west", "central"), min_healthy=2)
    orders = p.apps["orders"]
    # sets two fields, inherits the rest from the top level, not from AppPolicy()
    assert orders == replace(p.default, min_healthy=3, min_healthy_fraction=0.5)
    qualified = p.apps["payments/orders"]
    assert qualified == replace(p.default, order="rtt", allow=("east", "west"))
    assert qualified.min_healthy == 2  # not orders' 3: sections inherit from the default only
    assert p.apps["billing"].tiers == ("node", "cluster")
    assert p.apps["billing"].failover == ("west", "central")


def test_for_app_namespace_qualified_wins():
    p = parse_policy(tomllib_loads(POLICY_TOML))
    assert p.for_app("orders", "payments") is p.apps["payments/orders"]
    assert p.for_app("orders", "default") is p.apps["orders"]
    assert p.for_app("stock", "default") is p.default
    assert p.for_app("billing", "anything") is p.apps["billing"]


def tomllib_loads(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


BAD = [
    ({"bogus": 1}, "bogus is not a policy setting"),
    ({"apps": {"orders": {"bogus": 1}}}, "apps.orders.bogus is not a policy setting"),
    ({"min_healthy": -1}, "min_healthy must be a non-negative integer"),
    (
        {"apps": {"orders": {"min_healthy": -1}}},
        "apps.orders.min_healthy must be a non-negative integer",
    ),
    (
        {"apps": {"default/orders": {"min_healthy": -1}}},
        'apps."default/orders".min_healthy must be a non-negative integer',
    ),
    ({"min_healthy": True}, "min_healthy must be a non-negative integer"),
    ({"min_healthy": "2"}, "min_healthy must be a non-negative integer"),
    ({"min_healthy": 1.5}, "min_healthy must be a non-negative integer"),
    ({"min_healthy_fraction": 1.5}, "min_healthy_fraction must be a number from 0 to 1"),
    ({"min_healthy_fraction": -0.1}, "min_healthy_fraction must be a number from 0 to 1"),
    ({"min_healthy_fraction": math.nan}, "min_healthy_fraction must be a number from 0 to 1"),
    ({"min_healthy_fraction": "0.5"}, "min_healthy_fraction must be a number from 0 to 1"),
    ({"min_healthy_fraction": True}, "min_healthy_fraction must be a number from 0 to 1"),
    ({"tiers": ["node", "zonee"]}, "tiers lists unknown tier 'zonee'"),
    ({"tiers": ["node", "zone", "node"]}, "tiers lists tier 'node' twice"),
    ({"tiers": []}, "tiers must be a non-empty list of tiers"),
    ({"tiers": "node"}, "tiers must be a non-empty list of tiers"),
    ({"apps": {"orders": {"tiers": ["any", 3]}}}, "apps.orders.tiers lists unknown tier 3"),
    ({"tiers": [["node"]]}, "tiers lists unknown tier ['node']"),
    ({"failover": "west"}, "failover must be a list of cluster names"),
    ({"failover": ["west", "bad name"]}, "failover[1] must be 1-253 letters"),
    ({"failover": ["west", 7]}, "failover[1] must be 1-253 letters"),
    ({"failover": ["west", "west"]}, "failover lists cluster 'west' twice"),
    ({"allow": ["-east"]}, "allow[0] must be 1-253 letters"),
    ({"allow": "east"}, 'allow must be a list of cluster names or "*"'),
    ({"apps": {"x": {"allow": ["a", "a"]}}}, "apps.x.allow lists cluster 'a' twice"),
    ({"order": "random"}, "order must be one of 'weight', 'rtt'"),
    ({"apps": {"orders": {"order": 1}}}, "apps.orders.order must be one of"),
    ({"nearest_first": "yes"}, "nearest_first must be true or false"),
    ({"nearest_first": 1}, "nearest_first must be true or false"),
    ({"apps": ["orders"]}, "apps must be a table"),
    ({"apps": {"orders": 3}}, "apps.orders must be a table of policy settings"),
    ({"apps": {"a/b/c": {}}}, 'apps."a/b/c" must be named "app" or "namespace/app"'),
    ({"apps": {"/orders": {}}}, 'apps."/orders" name part'),
    ({"apps": {"ord ers": {}}}, 'apps."ord ers" name part'),
    # [apps.default.orders] instead of [apps."default/orders"]: say how to write it
    (
        {"apps": {"default": {"orders": {"min_healthy": 2}}}},
        'apps.default.orders is not a policy setting (write a namespace-qualified app as [apps."namespace/app"])',  # noqa: E501
    ),
]


@pytest.mark.parametrize(("data", "message"), BAD)
def test_parse_errors_name_the_field(data, message):
    with pytest.raises(PolicyError) as info:
        parse_policy(data, source="p.toml")
    text = str(info.value)
    assert text.startswith("p.toml: ")
    assert message in text
    assert "\n" not in text
    assert isinstance(info.value, ValueError)


def test_policy_error_default_source():
    with pytest.raises(PolicyError, match=r"^<policy>: min_healthy must be"):
        parse_policy({"min_healthy": -3})


def test_app_policy_validates_when_built():
    with pytest.raises(PolicyError, match="^min_healthy must be a non-negative integer$"):
        AppPolicy(min_healthy=-1)
    with pytest.raises(PolicyError, match="tiers lists unknown tier"):
        AppPolicy(tiers=("node", "nearby"))
    # lists become tuples and ints floats, so policies stay hashable and comparable
    p = AppPolicy(tiers=["node", "any"], failover=["west"], min_healthy_fraction=1)  # type: ignore[arg-type]
    assert p.tiers == ("node", "any") and p.failover == ("west",)
    assert p.min_healthy_fraction == 1.0 and isinstance(p.min_healthy_fraction, float)
    hash(p)


def test_allow_star_means_any_cluster():
    assert parse_policy({"allow": "*"}).default.allow is None
    assert parse_policy({"allow": None}).default.allow is None
    # a per-app section can lift the default's restriction
    p = parse_policy({"allow": ["east"], "apps": {"orders": {"allow": "*"}}})
    assert p.default.allow == ("east",)
    assert p.apps["orders"].allow is None
    assert parse_policy({"allow": []}).default.allow == ()


def test_fraction_accepts_toml_integers():
    assert parse_policy({"min_healthy_fraction": 1}).default.min_healthy_fraction == 1.0
    assert parse_policy({"min_healthy_fraction": 0}).default.min_healthy_fraction == 0.0


def test_load_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(PolicyError, match=r"policy file .*nope\.toml does not exist"):
        load_policy_file(path)


def test_load_unreadable_path_names_it(tmp_path):
    with pytest.raises(PolicyError, match=r"cannot read policy file .*"):
        load_policy_file(tmp_path)  # a directory


def test_load_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('tiers = ["node"]\nmin_healthy = = 2\n')
    with pytest.raises(PolicyError) as info:
        load_policy_file(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ")
    assert "line 2" in text and "column" in text
    assert "\n" not in text


def test_load_not_utf8(tmp_path):
    path = tmp_path / "latin.toml"
    path.write_bytes(b'order = "w\xe9ight"\n')
    with pytest.raises(PolicyError, match=r"latin\.toml: not UTF-8"):
        load_policy_file(path)


def test_load_semantic_error_names_file_and_field(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[apps.orders]\norder = "fastest"\n')
    with pytest.raises(PolicyError, match=r"p\.toml: apps\.orders\.order must be one of"):
        load_policy_file(path)


def test_policy_to_dict_is_json_and_round_trips(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY_TOML)
    p = load_policy_file(path)
    d = policy_to_dict(p)
    again = json.loads(json.dumps(d))
    assert parse_policy(again) == p
    assert d["allow"] == "*"
    assert d["apps"]["payments/orders"]["allow"] == ["east", "west"]


names = st.sampled_from(["east", "west", "central", "south", "a.b", "x_1"])
app_policies = st.builds(
    AppPolicy,
    tiers=st.lists(st.sampled_from(TIERS), unique=True, min_size=1).map(tuple),
    failover=st.lists(names, unique=True).map(tuple),
    min_healthy=st.integers(0, 10),
    min_healthy_fraction=st.floats(0, 1),
    order=st.sampled_from(["weight", "rtt"]),
    allow=st.none() | st.lists(names, unique=True).map(tuple),
    nearest_first=st.booleans(),
)
policies = st.builds(
    Policy,
    default=app_policies,
    apps=st.dictionaries(st.sampled_from(["orders", "default/orders", "ns.1/pay"]), app_policies),
)


@pytest.mark.slow
@PROPS
@given(policies)
def test_policy_to_dict_round_trips_any_policy(p):
    assert parse_policy(json.loads(json.dumps(policy_to_dict(p)))) == p


# ---------------------------------------------------------------------------
# select: rule by rule, on hand-made sets


def test_default_order_follows_tiers_and_only_the_nearest_is_active():
    out = select(ASKER, ALL_PLACES, AppPolicy(failover=("west",)))
    assert [r.tier for r in out] == ["node", "zone", "region", "cluster", "failover", "any", "any"]
    assert instances(out)[:5] == ["o-node", "o-zone", "o-region", "o-cluster", "o-west"]
    assert active(out) == ["o-node"]


def test_a_unexported_never_returned():
    hidden = replace(SAME_NODE, exported_to_asker=False)
    hidden_down = replace(SAME_ZONE, exported_to_asker=False, health="critical")
    for include in (False, True):
        out = select(ASKER, [hidden, hidden_down, WEST], AppPolicy(), include_unhealthy=include)
        assert instances(out) == ["o-west"]
        assert active(out) == ["o-west"]


def test_a_allow_restricts_clusters():
    policy = AppPolicy(allow=("west", "central"))
    out = select(ASKER, ALL_PLACES, policy, include_unhealthy=True)
    assert sorted(instances(out)) == ["o-central", "o-west"]
    # an empty allow list returns nothing at all
    assert select(ASKER, ALL_PLACES, AppPolicy(allow=()), include_unhealthy=True) == []


def test_b_unhealthy_after_healthy_only_on_request_never_active():
    node_down = down(SAME_NODE)
    west_cut_off = replace(WEST, reachable=False)  # passing, but unreachable: unhealthy
    zone_warning = replace(SAME_ZONE, health="warning")  # warning counts as healthy
    cands = [node_down, west_cut_off, zone_warning, CENTRAL]
    policy = AppPolicy(failover=("west",))
    out = select(ASKER, cands, policy)
    assert instances(out) == ["o-zone", "o-central"]
    assert active(out) == ["o-zone"]
    full = select(ASKER, cands, policy, include_unhealthy=True)
    assert instances(full) == ["o-zone", "o-central", "o-node", "o-west"]
    assert [r.active for r in full] == [True, False, False, False]
    assert [r.tier for r in full] == ["zone", "any", "node", "failover"]


def test_c_unlisted_tier_folds_into_the_next_listed_one():
    policy = AppPolicy(tiers=("node", "region", "cluster", "failover", "any"))
    out = select(ASKER, [SAME_ZONE, SAME_REGION], policy, include_unhealthy=True)
    assert {r.candidate.instance: r.tier for r in out} == {"o-zone": "region", "o-region": "region"}
    # one spill step: both active together
    assert sorted(active(out)) == ["o-region", "o-zone"]


def test_c_no_listed_tier_at_or_after_means_excluded():
    policy = AppPolicy(tiers=("node", "zone", "region", "cluster"))  # no failover, no any
    out = select(ASKER, ALL_PLACES, replace(policy, failover=("west",)), include_unhealthy=True)
    assert instances(out) == ["o-node", "o-zone", "o-region", "o-cluster"]
    # without "failover", a failover cluster folds into "any"
    policy = AppPolicy(tiers=("node", "any"), failover=("west",))
    out = select(ASKER, [WEST, SAME_ZONE], policy)
    assert {r.candidate.instance: r.tier for r in out} == {"o-west": "any", "o-zone": "any"}
    # the asker's own cluster is nearest (round trip 0) among the "any" clusters
    assert instances(out) == ["o-zone", "o-west"]
    assert instances(select(ASKER, [WEST, SAME_ZONE], policy, cluster_rtt={"west": 0.01})) == [
        "o-zone",
        "o-west",
    ]
    # unless measured otherwise
    rtt = {"west": 0.01, "east": 0.02}
    assert instances(select(ASKER, [WEST, SAME_ZONE], policy, cluster_rtt=rtt)) == [
        "o-west",
        "o-zone",
    ]


def test_c_clusters_folded_into_failover_go_first_one_step_each():
    # no zone, region or cluster tier: nearer copies fold into "failover", ahead
    # of the listed clusters, one spill step per cluster (by name)
    policy = AppPolicy(tiers=("node", "failover", "any"), failover=("central",))
    west_here = cand("o-west-here", "w7", "west", "us-east", "us-east-1a")  # zone tier
    west_here2 = replace(west_here, instance="o-west-here-2", node="w8")
    cands = [SAME_ZONE, west_here, west_here2, CENTRAL, SOUTH]
    out = select(ASKER, cands, policy)
    assert [r.tier for r in out] == ["failover"] * 4 + ["any"]
    assert instances(out)[0] == "o-zone"  # east < west
    assert sorted(instances(out)[1:3]) == ["o-west-here", "o-west-here-2"]
    assert instances(out)[3:] == ["o-central", "o-south"]
    assert active(out) == ["o-zone"]
    assert sorted(active(select(ASKER, cands, replace(policy, min_healthy=2)))) == [
        "o-west-here",
        "o-west-here-2",
        "o-zone",
    ]


def test_c_fold_tier():
    assert fold_tier("zone", ("node", "region", "any")) == "region"
    assert fold_tier("node", ("zone", "node")) == "node"
    assert fold_tier("node", ("region", "zone")) == "zone"  # canonical order, not listed order
    assert fold_tier("failover", ("node", "zone")) is None


def test_d_listed_tier_order_is_the_preference():
    policy = AppPolicy(tiers=("region", "node", "any"), min_healthy=10)
    out = select(ASKER, [SAME_NODE, SAME_ZONE, SAME_REGION, SAME_CLUSTER], policy)
    # zone folds into region, cluster into any; region is listed first
    assert [r.tier for r in out] == ["region", "region", "node", "any"]
    assert instances(out)[2:] == ["o-node", "o-cluster"]


def test_d_failover_follows_the_list_not_names():
    policy = AppPolicy(failover=("west", "central"))
    out = select(ASKER, [CENTRAL, WEST], policy)
    assert instances(out) == ["o-west", "o-central"]
    out = select(ASKER, [CENTRAL, WEST], replace(policy, failover=("central", "west")))
    assert instances(out) == ["o-central", "o-west"]


def test_d_any_nearest_cluster_first_unknown_last_then_name():
    cands = [WEST, CENTRAL, SOUTH]
    rtt = {"west": 0.080, "central": 0.020}
    assert instances(select(ASKER, cands, AppPolicy(), cluster_rtt=rtt)) == [
        "o-central",
        "o-west",
        "o-south",
    ]
    assert instances(select(ASKER, cands, AppPolicy(), cluster_rtt={"south": 0.3})) == [
        "o-south",
        "o-central",
        "o-west",
    ]
    # without measurements, or with nearest_first off: by name
    assert instances(select(ASKER, cands, AppPolicy())) == ["o-central", "o-south", "o-west"]
    off = AppPolicy(nearest_first=False)
    assert instances(select(ASKER, cands, off, cluster_rtt=rtt)) == [
        "o-central",
        "o-south",
        "o-west",
    ]


def test_d_any_prefers_the_nearest_other_cluster_as_the_active_one():
    cands = [down(SAME_NODE), WEST, CENTRAL, SOUTH]
    out = select(ASKER, cands, AppPolicy(), cluster_rtt={"west": 0.070, "central": 0.015})
    assert active(out) == ["o-central"]


def zone_copies(weights: list[int]) -> list[Candidate]:
    return [
        cand(f"z{i}", f"n{10 + i}", "east", "us-east", "us-east-1a", weight=w)
        for i, w in enumerate(weights)
    ]


def test_d_weight_order_is_deterministic_and_weight_zero_is_last():
    cands = zone_copies([0, 1, 1, 0, 1])
    out = select(ASKER, cands, AppPolicy())
    assert out == select(ASKER, list(reversed(cands)), AppPolicy())
    assert {r.candidate.instance for r in out[-2:]} == {"z0", "z3"}
    assert instances(out[-2:]) == ["z0", "z3"]  # ties by key
    assert math.isinf(hrw_score(ASKER, cands[0]))
    # all healthy and in one tier: all active, weight 0 included (drained, not down)
    assert len(active(out)) == 5


def test_d_weight_order_differs_between_askers():
    cands = zone_copies([1] * 8)
    firsts = {
        select(replace(ASKER, node=f"a{i}"), cands, AppPolicy())[0].candidate.instance
        for i in range(50)
    }
    assert len(firsts) == 8


def test_d_rendezvous_keeps_first_choice_when_another_copy_goes():
    cands = zone_copies([1, 2, 3, 1, 1, 2])
    for i in range(100):
        asker = replace(ASKER, node=f"a{i}")
        order = instances(select(asker, cands, AppPolicy()))
        for gone in order[1:]:
            rest = [c for c in cands if c.instance != gone]
            assert instances(select(asker, rest, AppPolicy()))[0] == order[0]


def test_d_rtt_order_unknown_last_ties_by_key():
    a = cand("a", "n12", "east", "us-east", "us-east-1a", rtt=0.004)
    b = cand("b", "n11", "east", "us-east", "us-east-1a", rtt=0.001)
    c = cand("c", "n13", "east", "us-east", "us-east-1a")
    d = cand("d", "n10", "east", "us-east", "us-east-1a", rtt=0.004)
    out = select(ASKER, [a, b, c, d], AppPolicy(order="rtt"))
    assert instances(out) == ["b", "d", "a", "c"]  # d before a: node n10 < n12


def test_e_remote_copies_join_before_the_last_local_one_dies():
    # Complaint 1: "remote copies are used only when zero local copies remain".
    local = [SAME_ZONE, down(SAME_REGION), down(SAME_CLUSTER)]
    policy = AppPolicy(failover=("west",), min_healthy=2)
    out = select(ASKER, [*local, WEST, CENTRAL], policy)
    assert active(out) == ["o-zone", "o-west"]
    # with enough local copies, remote ones stay idle
    out = select(ASKER, [SAME_ZONE, SAME_REGION, WEST], policy)
    assert active(out) == ["o-zone", "o-region"]


def test_e_min_healthy_accumulates_over_tiers():
    out = select(ASKER, ALL_PLACES, AppPolicy(min_healthy=3, failover=("west",)))
    assert active(out) == ["o-node", "o-zone", "o-region"]


def test_e_fraction_spills_past_a_mostly_dead_tier():
    # Complaint 2: a tier with one healthy copy of four is not "enough".
    zone = zone_copies([1, 1, 1, 1])
    zone = [zone[0]] + [down(c) for c in zone[1:]]
    cands = [*zone, SAME_REGION, SAME_CLUSTER]
    assert active(select(ASKER, cands, AppPolicy())) == ["z0"]
    half = AppPolicy(min_healthy_fraction=0.5)
    assert active(select(ASKER, cands, half)) == ["z0", "o-region"]
    # 2 of 4 meets 0.5 exactly
    zone2 = [zone[0], replace(zone[1], health="passing"), *zone[2:]]
    assert sorted(active(select(ASKER, [*zone2, SAME_REGION], half))) == ["z0", "z1"]
    # 7 of 25 meets 0.28, though 0.28 * 25 == 7.000000000000001 in floating point
    many = zone_copies([1] * 25)
    many = many[:7] + [down(c) for c in many[7:]]
    policy = AppPolicy(min_healthy_fraction=0.28)
    assert len(active(select(ASKER, [*many, SAME_REGION], policy))) == 7


def test_e_each_failover_cluster_is_its_own_step():
    local_down = [down(SAME_NODE), down(SAME_ZONE)]
    west2 = replace(WEST, instance="o-west-2", node="w2")
    policy = AppPolicy(failover=("west", "central"))
    out = select(ASKER, [*local_down, WEST, west2, CENTRAL], policy)
    assert sorted(active(out)) == ["o-west", "o-west-2"]
    # west alone is not enough for three: central joins
    out = select(ASKER, [*local_down, WEST, west2, CENTRAL], replace(policy, min_healthy=3))
    assert sorted(active(out)) == ["o-central", "o-west", "o-west-2"]


def test_e_all_steps_exhausted_everything_healthy_is_active():
    out = select(ASKER, [*ALL_PLACES, down(cand("x", "n9", "east"))], AppPolicy(min_healthy=100))
    assert sorted(active(out)) == sorted(c.instance for c in ALL_PLACES)


def test_e_min_healthy_zero_never_leaves_the_active_set_empty():
    cands = [down(SAME_NODE), SAME_REGION, WEST]
    assert active(select(ASKER, cands, AppPolicy(min_healthy=0))) == ["o-region"]


def test_e_counting_does_not_depend_on_include_unhealthy():
    cands = [SAME_ZONE, down(SAME_REGION), down(SAME_CLUSTER), WEST, CENTRAL]
    policy = AppPolicy(min_healthy=2, min_healthy_fraction=0.6)
    short = select(ASKER, cands, policy)
    full = select(ASKER, cands, policy, include_unhealthy=True)
    assert full[: len(short)] == short
    assert active(short) == ["o-zone", "o-central"]


def test_f_input_order_does_not_matter():
    rng = random.Random(4)
    policy = AppPolicy(failover=("central",), min_healthy=3)
    cands = [*ALL_PLACES, *zone_copies([1, 2, 0, 5]), down(cand("d", "n7", "west"))]
    first = select(ASKER, cands, policy, include_unhealthy=True)
    for _ in range(20):
        rng.shuffle(cands)
        assert select(ASKER, cands, policy, include_unhealthy=True) == first


def test_candidate_validation():
    with pytest.raises(ValueError, match="health"):
        cand("x", "n", "c", health="ok")
    with pytest.raises(ValueError, match="weight"):
        cand("x", "n", "c", weight=-1)
    with pytest.raises(ValueError, match="rtt"):
        cand("x", "n", "c", rtt=math.inf)
    assert cand("x", "n", "c").key == ("c", "n", "x")


# ---------------------------------------------------------------------------
# select: properties

CLUSTERS = ["east", "west", "central", "south"]
# (cluster, region, zone) of a few places; nodes are drawn per candidate
PLACES = [
    ("east", "us-east", "us-east-1a"),
    ("east", "us-east", "us-east-1b"),
    ("east", "eu-west", "eu-west-1a"),
    ("west", "us-east", "us-east-1a"),  # another cluster in the asker's zone
    ("west", "us-west", "us-west-1a"),
    ("central", "us-central", "us-central-1a"),
    ("south", "", ""),
]
ASKERS = [
    ASKER,
    Topology("w1", "west", "us-west", "us-west-1a"),
    Topology("n9", "east", "", ""),
]

candidates_st = st.lists(
    st.builds(
        lambda place, node, inst, health, weight, reachable, exported, rtt: cand(
            inst,
            node,
            place[0],
            place[1],
            place[2],
            health=health,
            weight=weight,
            reachable=reachable,
            exported_to_asker=exported,
            rtt=rtt,
        ),
        st.sampled_from(PLACES),
        st.sampled_from(["n1", "n2", "w1", "n9"]),
        st.sampled_from(["i1", "i2", "i3"]),
        st.sampled_from(["passing", "passing", "warning", "critical"]),
        st.integers(0, 4),
        st.booleans() | st.just(True),
        st.booleans() | st.just(True),
        st.none() | st.sampled_from([0.001, 0.002, 0.010]),
    ),
    unique_by=lambda c: c.key,
    max_size=24,
)
policy_st = st.builds(
    AppPolicy,
    tiers=st.lists(st.sampled_from(TIERS), unique=True, min_size=1).map(tuple),
    failover=st.lists(st.sampled_from(CLUSTERS), unique=True).map(tuple),
    min_healthy=st.integers(0, 6),
    min_healthy_fraction=st.sampled_from([0.0, 0.25, 0.5, 2 / 3, 1.0]),
    order=st.sampled_from(["weight", "rtt"]),
    allow=st.none() | st.lists(st.sampled_from(CLUSTERS), unique=True).map(tuple),
    nearest_first=st.booleans(),
)
rtt_st = st.dictionaries(st.sampled_from(CLUSTERS), st.sampled_from([0.005, 0.02, 0.09]))


def visible(asker: Topology, c: Candidate, policy: AppPolicy) -> bool:
    if not c.exported_to_asker or (policy.allow is not None and c.cluster not in policy.allow):
        return False
    t = tier_of(asker, Topology(c.node, c.cluster, c.region, c.zone), policy.failover)
    return any(TIER_RANK[listed] >= TIER_RANK[t] for listed in policy.tiers)


@pytest.mark.slow
@PROPS
@given(st.sampled_from(ASKERS), candidates_st, policy_st, rtt_st, st.booleans())
def test_prop_i_only_visible_candidates_each_once(asker, cands, policy, rtt, include):
    out = select(asker, cands, policy, include_unhealthy=include, cluster_rtt=rtt)
    keys = [r.candidate.key for r in out]
    assert len(keys) == len(set(keys))
    for r in out:
        assert r.candidate.exported_to_asker
        assert policy.allow is None or r.candidate.cluster in policy.allow
        assert r.tier in policy.tiers
    expected = {c.key for c in cands if visible(asker, c, policy) and (include or c.healthy)}
    assert set(keys) == expected


@pytest.mark.slow
@PROPS
@given(st.sampled_from(ASKERS), candidates_st, policy_st, rtt_st)
def test_prop_ii_no_unhealthy_before_healthy(asker, cands, policy, rtt):
    full = select(asker, cands, policy, include_unhealthy=True, cluster_rtt=rtt)
    health = [r.candidate.healthy for r in full]
    assert health == sorted(health, reverse=True)
    assert not any(r.active for r in full if not r.candidate.healthy)
    short = select(asker, cands, policy, cluster_rtt=rtt)
    assert all(r.candidate.healthy for r in short)
    assert full[: len(short)] == short  # same ranks and active flags either way


@pytest.mark.slow
@PROPS
@given(st.sampled_from(ASKERS), candidates_st, policy_st, rtt_st, st.randoms(use_true_random=False))
def test_prop_iii_independent_of_input_order(asker, cands, policy, rtt, rng):
    first = select(asker, cands, policy, include_unhealthy=True, cluster_rtt=rtt)
    shuffled = list(cands)
    rng.shuffle(shuffled)
    assert select(asker, iter(shuffled), policy, include_unhealthy=True, cluster_rtt=rtt) == first


def step_of(r: Ranked) -> tuple[str, str | None]:
    """The spill step: a tier, or one cluster of "failover" / "any"."""
    return (r.tier, r.candidate.cluster if r.tier in ("failover", "any") else None)


@pytest.mark.slow
@PROPS
@given(st.sampled_from(ASKERS), candidates_st, policy_st, rtt_st)
def test_prop_iv_active_set_is_the_smallest_step_prefix_meeting_thresholds(
    asker, cands, policy, rtt
):
    full = select(asker, cands, policy, include_unhealthy=True, cluster_rtt=rtt)
    healthy = [r for r in full if r.candidate.healthy]
    # tiers come in the policy's order, and each step is contiguous
    positions = [policy.tiers.index(r.tier) for r in healthy]
    assert positions == sorted(positions)
    steps: list[tuple[str, str | None]] = []
    for r in healthy:
        if not steps or steps[-1] != step_of(r):
            assert step_of(r) not in steps
            steps.append(step_of(r))
    # recompute the active set from the definition
    totals = Counter(step_of(r) for r in full)
    healthy_per_step = Counter(step_of(r) for r in healthy)
    need = max(policy.min_healthy, 1)
    chosen: set[tuple[str, str | None]] = set()
    accumulated = 0
    for s in steps:
        chosen.add(s)
        accumulated += healthy_per_step[s]
        if accumulated >= need and healthy_per_step[s] / totals[s] >= policy.min_healthy_fraction:
            break
    assert {r.candidate.key for r in full if r.active} == {
        r.candidate.key for r in healthy if step_of(r) in chosen
    }
    # active ones lead the answer
    flags = [r.active for r in full]
    assert flags == sorted(flags, reverse=True)
    # nonempty whenever a healthy endpoint is visible
    assert any(flags) == bool(healthy)


@pytest.mark.slow
@PROPS
@given(st.sampled_from(ASKERS), candidates_st, policy_st, rtt_st)
def test_prop_failover_and_any_clusters_in_preference_order(asker, cands, policy, rtt):
    out = select(asker, cands, policy, cluster_rtt=rtt)
    listed = [
        policy.failover.index(r.candidate.cluster)
        for r in out
        if r.tier == "failover" and r.candidate.cluster in policy.failover
    ]
    assert listed == sorted(listed)
    if policy.nearest_first:
        known = {**rtt, asker.cluster: rtt.get(asker.cluster, 0.0)}
        near = [
            (c not in known, known.get(c, 0.0), c)
            for c in (r.candidate.cluster for r in out if r.tier == "any")
        ]
        assert near == sorted(near)


def test_prop_v_first_choice_frequency_follows_weight():
    weights = [1, 2, 3, 4]
    cands = zone_copies(weights)
    askers = [Topology(f"asker-{i}", "east", "us-east", "us-east-1b") for i in range(4000)]
    firsts = Counter(select(a, cands, AppPolicy())[0].candidate.instance for a in askers)
    total = sum(weights)
    for i, w in enumerate(weights):
        share = firsts[f"z{i}"] / len(askers)
        # sd of a share near 0.4 over 4000 askers is about 0.008: 0.03 is generous
        assert abs(share - w / total) < 0.03, (i, share)
    # an asker in another cluster sees the same proportions
    far = [Topology(f"far-{i}", "west", "us-west", "us-west-1a") for i in range(4000)]
    firsts = Counter(select(a, cands, AppPolicy())[0].candidate.instance for a in far)
    assert abs(firsts["z3"] / 4000 - 0.4) < 0.03


toml_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 5)
    | st.floats(allow_nan=True)
    | st.sampled_from(["*", "node", "zone", "any", "west", "weight", "rtt", "a/b", "", "x y"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["orders", "default/orders", "tiers", "x"]), inner)
    ),
    max_leaves=12,
)
keys = st.sampled_from(
    ["tiers", "failover", "min_healthy", "min_healthy_fraction", "order", "allow"]
    + ["nearest_first", "apps", "bogus"]
)


@pytest.mark.slow
@PROPS
@given(st.dictionaries(keys, toml_values))
def test_prop_parse_raises_only_policy_error(data):
    try:
        p = parse_policy(data)
    except PolicyError as e:
        assert "\n" not in str(e)
    else:
        assert parse_policy(policy_to_dict(p)) == p
