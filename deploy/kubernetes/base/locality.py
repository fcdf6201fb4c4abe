"""Write the agent's locality (and a bridge's WAN address) from its Node object.

Runs as the init container of every meshd pod, with the same image.  The
downward API cannot read node labels, so this asks the API server for the
pod's own Node (the ServiceAccount may only ``get`` nodes) and writes a TOML
file that the agent reads with ``--config``:

- ``region`` and ``zone`` from the ``topology.kubernetes.io/region`` and
  ``topology.kubernetes.io/zone`` labels, left out when a label is missing
  (the agent then has no region or zone, which orders it last in those tiers);
- on bridges (``MESHD_WAN_PORT`` set), ``wan_advertise``: the node's
  ExternalIP, else its InternalIP, with that port, the address other
  clusters dial this bridge at.

A file, not command-line flags: no shell builds the agent's command line, so
no label value can reach one.  Every value is checked against meshd's name
alphabet before it is written anyway.  Exit 0 when the file is written, 1 with
one line on stderr otherwise (the kubelet then retries the init container).

Environment: ``NODE_NAME`` (spec.nodeName, required), ``MESHD_LOCALITY_FILE``
(where to write, required), ``MESHD_WAN_PORT`` (optional),
``KUBERNETES_SERVICE_HOST`` and ``KUBERNETES_SERVICE_PORT`` (set by the
kubelet), ``MESHD_SA_DIR`` (the ServiceAccount mount; tests point it
elsewhere).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
#: A Node object lists the node's images and can reach a few MiB; anything
#: larger is not a Node and is refused rather than held in memory.
MAX_BODY = 8 * 1024 * 1024
#: Each request's timeout and how often to try: the API server may be
#: restarting while nodes come up.  The kubelet restarts a failed init
#: container with its own backoff, so a few tries here are enough.
TIMEOUT = 10.0
ATTEMPTS = 5
RETRY_DELAY = 2.0
# meshd's names (meshd/wire.py check_name); Kubernetes label values are a
# subset, so a label that fails this is not a label the kubelet set.
_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.\-]{0,251}[A-Za-z0-9])?")


class LocalityError(Exception):
    """Why the file could not be written, as one sentence."""


def locality_toml(node: dict[str, Any], wan_port: int | None) -> str:
    """The TOML the agent reads, from a Node object as the API server returns it."""
    metadata = node.get("metadata")
    labels = metadata.get("labels") if isinstance(metadata, dict) else None
    if not isinstance(labels, dict):
        labels = {}
    lines = ["# Written by the meshd init container from this node's labels."]
    for key, label in (("region", REGION_LABEL), ("zone", ZONE_LABEL)):
        value = labels.get(label)
        if value is None:
            continue
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            raise LocalityError(f"node label {label}={value!r:.80} is not a usable meshd name")
        lines.append(f'{key} = "{value}"')
    if wan_port is not None:
        lines.append(f'wan_advertise = "{_node_address(node)}:{wan_port}"')
    return "\n".join(lines) + "\n"


def _node_address(node: dict[str, Any]) -> str:
    status = node.get("status")
    addresses = status.get("addresses") if isinstance(status, dict) else None
    found: dict[str, str] = {}
    for entry in addresses if isinstance(addresses, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("address"), str):
            found.setdefault(str(entry.get("type")), entry["address"])
    for kind in ("ExternalIP", "InternalIP"):
        if kind in found:
            try:
                ip = ipaddress.ip_address(found[kind])
            except ValueError:
                raise LocalityError(f"node {kind} {found[kind]!r:.80} is not an IP") from None
            return f"[{ip}]" if ip.version == 6 else str(ip)
    raise LocalityError("the node has neither an ExternalIP nor an InternalIP address")


def fetch_node(base_url: str, name: str, token: str, context: ssl.SSLContext) -> dict[str, Any]:
    """GET /api/v1/nodes/NAME, as JSON; LocalityError on any failure."""
    url = f"{base_url}/api/v1/nodes/{urllib.parse.quote(name, safe='')}"
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:
            body = response.read(MAX_BODY + 1)
    except urllib.error.HTTPError as exc:
        raise LocalityError(f"GET {url}: HTTP {exc.code} {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise LocalityError(f"GET {url}: {exc}") from None
    if len(body) > MAX_BODY:
        raise LocalityError(f"GET {url}: the answer is over {MAX_BODY} bytes")
    try:
        node = json.loads(body)
    except ValueError:
        raise LocalityError(f"GET {url}: the answer is not JSON") from None
    if not isinstance(node, dict) or node.get("kind") != "Node":
        raise LocalityError(f"GET {url}: the answer is not a Node")
    return node


def write_atomic(path: str, text: str) -> None:
    # The agent's container starts only after this one exits, but a restarted
    # init container must never leave half a file for the next agent.
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(text)
    os.replace(tmp, path)


def _env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise LocalityError(f"${name} is not set")
    return value


def run() -> str:
    """Fetch the node and write the file; the file's path."""
    node_name = _env("NODE_NAME")
    out = _env("MESHD_LOCALITY_FILE")
    port_text = os.environ.get("MESHD_WAN_PORT", "")
    wan_port = None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise LocalityError(f"$MESHD_WAN_PORT {port_text!r:.20} is not a port number")
        wan_port = int(port_text)
    host = _env("KUBERNETES_SERVICE_HOST")
    port = _env("KUBERNETES_SERVICE_PORT")
    sa_dir = os.environ.get("MESHD_SA_DIR", SA_DIR)
    try:
        with open(os.path.join(sa_dir, "token"), encoding="ascii") as f:
            token = f.read().strip()
        context = ssl.create_default_context(cafile=os.path.join(sa_dir, "ca.crt"))
    except (OSError, ValueError) as exc:
        raise LocalityError(f"cannot read the ServiceAccount's token or CA: {exc}") from None
    base = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    for attempt in range(ATTEMPTS):
        try:
            node = fetch_node(base, node_name, token, context)
            break
        except LocalityError:
            if attempt == ATTEMPTS - 1:
                raise
            time.sleep(RETRY_DELAY)
    write_atomic(out, locality_toml(node, wan_port))
    return out


def main() -> int:
    try:
        out = run()
    except LocalityError as exc:
        print(f"meshd-locality: error: {exc}", file=sys.stderr)
        return 1
    print(f"meshd-locality: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
