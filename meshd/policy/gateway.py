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
"""

from __future__ import annotations

import hashlib
import re

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


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
