import pytest

from meshd.policy.gateway import sni_label, sni_name, split_hostport


def test_plain_names_are_kept():
    assert sni_name("orders-1", "orders", "default", "east", "mesh.local") == (
        "orders-1.orders.default.east.mesh.local"
    )


@pytest.mark.parametrize("name", ["Orders", "a.b", "under_score", "x" * 64, "x--abc"])
def test_names_that_are_not_labels_are_hashed(name):
    label = sni_label(name)
    assert label.startswith("x--") and len(label) == 3 + 32
    assert sni_label(name) == label  # stable


def test_components_cannot_be_confused():
    # "a.b" in one place must not read like two labels "a" and "b".
    one = sni_name("i", "a.b", "default", "east", "mesh.local")
    two = sni_name("i", "a", "b", "east", "mesh.local")
    assert one != two
    assert len(one.split(".")) == len(["i", "x", "default", "east", "mesh", "local"])


def test_split_hostport():
    assert split_hostport("127.0.0.1:15443") == ("127.0.0.1", 15443)
    assert split_hostport("[::1]:443") == ("::1", 443)
    for bad in ["nohost", ":1", "h:0", "h:x"]:
        with pytest.raises(ValueError):
            split_hostport(bad)
