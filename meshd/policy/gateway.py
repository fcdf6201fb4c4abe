"""Gateways: how an endpoint behind another cluster's gateway is answered.

A cluster whose nodes are not directly routable from elsewhere declares a
gateway (``host:port``, agent option ``gateway``).  To askers in *other*
clusters its endpoints are answered as the gateway's address and port, with
an SNI name that the gateway routes on; inside their own cluster they stay
direct.

The SNI name is ``<instance>.<app>.<namespace>.<cluster>.<trust-domain>``,
each of the first four a DNS label:

- the name itself when it already is one: 1-63 of ``a-z0-9-``, starting and
  ending with a letter or digit, and not starting with ``x--``;
- otherwise ``x--`` followed by 32 hex digits of BLAKE2b over the name
  (upper case, ``.`` or ``_`` in a name, or a name over 63 characters).

Each component maps to its label one to one (a hashed label cannot collide
with a plain one: plain labels never start with ``x--``), so the name is
unique per (instance, app, namespace, cluster) and the gateway can route on
it without any lookup table.

SNI only helps clients that speak TLS with a host name.  Dapr's sidecar dials
``Service.Address:Meta.DAPR_PORT`` from a Consul answer and, with its mTLS on,
sends no SNI for an IP address (and no TLS at all with mTLS off), so a
gateway cannot tell its connections apart by name (docs/dapr-gateways.md).
For those, a gateway (``meshd gateway``) gives every instance it carries a
port of its own and publishes the mapping as *route records*: instances of
app :data:`ROUTE_APP` in namespace :data:`ROUTE_NAMESPACE`, registered with
the gateway's local agent, whose address and port are where the gateway
listens and whose meta names the instance behind it and, again, where the
gateway listens (:func:`route_meta`): askers in other clusters see every
record of a gateway's cluster with the gateway's published address and port
in place of the record's own, so the route's must travel in the meta.
A route record is believed only for an instance of the route record's own
cluster: the record is signed by a node of that cluster, so no other
cluster can redirect its traffic.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

#: The app and namespace route records are registered under.
ROUTE_APP = "meshd-gateway"
ROUTE_NAMESPACE = "default"
#: Meta keys of a route record: the instance it leads to.  Consul's rules for
#: meta keys (letters, digits, ``-``, ``_``) so Consul clients read them too.
ROUTE_NAMESPACE_KEY = "route-namespace"
ROUTE_APP_KEY = "route-app"
ROUTE_INSTANCE_KEY = "route-instance"
ROUTE_ADDRESS_KEY = "route-address"
ROUTE_PORT_KEY = "route-port"

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_PORT = re.compile(r"[0-9]{1,5}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _dialable(host: str) -> bool:
    """An IP literal or a DNS name: nothing that smuggles a port, path or space into a dial."""
    if len(host) > 253:
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return all(_HOST_LABEL.fullmatch(label) for label in host.split("."))


def sni_label(name: str) -> str:
    if _LABEL.match(name) and not name.startswith("x--"):
        return name
    return "x--" + hashlib.blake2b(name.encode(), digest_size=16).hexdigest()


def sni_name(instance: str, app: str, namespace: str, cluster: str, trust_domain: str) -> str:
    labels = (sni_label(instance), sni_label(app), sni_label(namespace), sni_label(cluster))
    return ".".join((*labels, trust_domain))


def split_hostport(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` of a declared gateway."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"gateway {value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class Route:
    """What a route record says: ``address:port`` of a gateway leads to one instance."""

    namespace: str
    app: str
    instance: str
    address: str
    port: int

    def meta(self) -> dict[str, str]:
        return {
            ROUTE_NAMESPACE_KEY: self.namespace,
            ROUTE_APP_KEY: self.app,
            ROUTE_INSTANCE_KEY: self.instance,
            ROUTE_ADDRESS_KEY: self.address,
            ROUTE_PORT_KEY: str(self.port),
        }


def route_of(meta: Mapping[str, str]) -> Route | None:
    """The route a record's meta states; None unless every field is there and well formed.

    The meta comes from a peer: a bad value makes the record no route at all
    rather than a route to somewhere unintended.
    """
    keys = (ROUTE_NAMESPACE_KEY, ROUTE_APP_KEY, ROUTE_INSTANCE_KEY, ROUTE_ADDRESS_KEY)
    values = [meta.get(k) for k in keys]
    port = meta.get(ROUTE_PORT_KEY) or ""
    if not all(values) or not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        return None
    namespace, app, instance, address = (str(v) for v in values)
    if not _dialable(address):
        return None
    return Route(namespace, app, instance, address, int(port))
