from meshd.policy.locality import TIERS, Topology, tier_of

ASKER = Topology(node="n1", cluster="east", region="us-east", zone="us-east-1a")


def test_tiers_in_contract_order():
    assert TIERS == ("node", "zone", "region", "cluster", "failover", "any")


def test_each_tier():
    assert tier_of(ASKER, Topology("n1", "east", "us-east", "us-east-1a")) == "node"
    assert tier_of(ASKER, Topology("n2", "east", "us-east", "us-east-1a")) == "zone"
    # zone and region are places: another cluster in our zone is still "zone"
    assert tier_of(ASKER, Topology("n9", "west", "us-east", "us-east-1a")) == "zone"
    assert tier_of(ASKER, Topology("n3", "east", "us-east", "us-east-1b")) == "region"
    assert tier_of(ASKER, Topology("n4", "east", "eu-west", "eu-west-1a")) == "cluster"
    assert tier_of(ASKER, Topology("n5", "west", "us-west", "z"), ("west",)) == "failover"
    assert tier_of(ASKER, Topology("n5", "west", "us-west", "z")) == "any"


def test_unknown_places_never_match():
    blank = Topology("n1", "east")
    assert tier_of(blank, Topology("n2", "east")) == "cluster"
    # the same node name in another cluster is another node
    assert tier_of(ASKER, Topology("n1", "west", "x", "y")) == "any"
