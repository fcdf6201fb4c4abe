"""deploy/kubernetes and deploy/dapr: rendered, schema-checked, linted, and read for mistakes.

No cluster is needed.  The Kustomize trees are rendered with `kubectl
kustomize` when kubectl is installed (that part is skipped otherwise, saying
so); every raw file is checked too.  Built-in kinds are validated against the
Kubernetes JSON schemas (kubernetes-validate); cert-manager and Dapr kinds
have no schema there, so their apiVersion, kind and required fields are
checked by hand.  Then checks that catch real mistakes: probes, the token,
RBAC, bridges, every agent flag, the certificate's SPIFFE ID, the policy
mount; and the locality init script against a fake API server over TLS.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import ssl
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, cast

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from yamllint import linter  # type: ignore[import-untyped]
from yamllint.config import YamlLintConfig  # type: ignore[import-untyped]

from meshd.agent import run as agent_run
from meshd.agent.config import load_config
from meshd.cli import build_parser
from meshd.identity import BRIDGE_ROLE_URI, parse_spiffe_uri
from meshd.policy.policy import load_policy_file

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DAPR = DEPLOY / "dapr"
KUSTOMIZATIONS = [
    K8S / "base",
    K8S / "overlays" / "east",
    K8S / "overlays" / "west",
    DAPR / "base",
    DAPR / "east",
    DAPR / "west",
]
OVERLAYS = {"east": K8S / "overlays" / "east", "west": K8S / "overlays" / "west"}
KUBERNETES_VERSION = "1.32.0"
TRUST_DOMAIN = "mesh.example"

# Kinds whose schemas kubernetes-validate does not ship: the fields each must have.
CRD_REQUIRED: dict[tuple[str, str], list[str]] = {
    ("cert-manager.io/v1", "Issuer"): ["metadata.name", "spec.ca.secretName"],
    ("cert-manager.io/v1", "ClusterIssuer"): ["metadata.name", "spec.ca.secretName"],
    ("dapr.io/v1alpha1", "Configuration"): [
        "metadata.name",
        "spec.nameResolution.component",
        "spec.nameResolution.configuration",
    ],
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): [],
}


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _raw_objects() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object in a file of deploy/ (not patches, not kustomizations)."""
    found = []
    for path in _yaml_files():
        for doc in _docs(path.read_text()):
            if isinstance(doc, dict) and "apiVersion" in doc and doc.get("kind") != "Kustomization":
                found.append((path, doc))
    return found


def _render(directory: Path) -> list[dict[str, Any]]:
    kubectl = _kubectl()
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, f"kubectl kustomize {directory}: {out.stderr}"
    return _docs(out.stdout)


def _kubectl() -> str:
    """kubectl, if it has a kustomize that knows `replacements` (v4.1+; v5 tested)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` cannot render the overlays")
    out = subprocess.run(
        [kubectl, "version", "--client", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    try:
        version = json.loads(out.stdout).get("kustomizeVersion", "")
    except ValueError:
        version = ""
    match = re.match(r"v(\d+)\.", version)
    if match is None or int(match.group(1)) < 5:
        # Debian's kubernetes-client (1.20) embeds kustomize v2, which has no
        # `replacements`: rendering there would fail for the tool, not the files.
        pytest.skip(f"kubectl's kustomize is {version or 'unknown'}; rendering needs v5 or later")
    return kubectl


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {str(d.relative_to(DEPLOY)): _render(d) for d in KUSTOMIZATIONS}


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for obj in objs:
        if obj.get("kind") == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind} {name} among {[o.get('kind') for o in objs]}")


def _container(ds: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    key = "initContainers" if init else "containers"
    for c in ds["spec"]["template"]["spec"][key]:
        if c["name"] == name:
            return cast(dict[str, Any], c)
    raise AssertionError(f"{ds['metadata']['name']} has no container {name}")


def _flags(container: dict[str, Any]) -> dict[str, list[str]]:
    """The agent's --flag=value arguments, by flag."""
    args = container["args"]
    assert args[0] == "agent", args
    flags: dict[str, list[str]] = {}
    for arg in args[1:]:
        assert arg.startswith("--") and "=" in arg, f"write agent flags as --flag=value: {arg!r}"
        flag, value = arg.split("=", 1)
        flags.setdefault(flag, []).append(value)
    return flags


def _mount_of(container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mount whose directory holds ``path``."""
    for m in container.get("volumeMounts", []):
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            return cast(dict[str, Any], m)
    raise AssertionError(f"{container['name']}: nothing is mounted where {path} is")


def _volume(ds: dict[str, Any], name: str) -> dict[str, Any]:
    for v in ds["spec"]["template"]["spec"]["volumes"]:
        if v["name"] == name:
            return cast(dict[str, Any], v)
    raise AssertionError(f"{ds['metadata']['name']} has no volume {name}")


def _daemonsets(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = [o for o in objs if o.get("kind") == "DaemonSet"]
    assert {d["metadata"]["name"] for d in found} == {"meshd", "meshd-bridge"}
    return found


# ---------------------------------------------------------------------------
# Structure: every kustomization's files exist, without kubectl.


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: str(d.relative_to(DEPLOY)))
def test_kustomization_references_exist(directory: Path) -> None:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    for res in k.get("resources", []):
        target = directory / res
        assert target.exists(), f"{directory}: resource {res} does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").exists(), f"{target} is not a kustomization"
    for gen in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
        for f in gen.get("files", []):
            assert (directory / f.split("=")[-1]).is_file(), f"{directory}: {f} missing"
    # Every patch names a file that exists and a target the tree defines.
    names = _names_defined(directory)
    for patch in k.get("patches", []):
        assert (directory / patch["path"]).is_file(), f"{directory}: patch {patch['path']}"
        t = patch["target"]
        assert (t["kind"], t["name"]) in names, f"{directory}: patch target {t} is not defined"
    for rep in k.get("replacements", []):
        src = rep["source"]
        assert ("ConfigMap", src["name"]) in names or src["name"] in {n for _, n in names}
        for tgt in rep["targets"]:
            assert any(kind == tgt["select"]["kind"] for kind, _ in names)


def _names_defined(directory: Path) -> set[tuple[str, str]]:
    """(kind, name) of every object a kustomization and its bases define or generate."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    names: set[tuple[str, str]] = set()
    for res in k.get("resources", []):
        target = directory / res
        if target.is_dir():
            names |= _names_defined(target)
        else:
            for doc in _docs(target.read_text()):
                names.add((doc["kind"], doc["metadata"]["name"]))
    for gen in k.get("configMapGenerator", []):
        names.add(("ConfigMap", gen["name"]))
    return names


# ---------------------------------------------------------------------------
# Schemas and lint.


def _validate(obj: dict[str, Any], where: str) -> None:
    key = (str(obj.get("apiVersion")), str(obj.get("kind")))
    if key in CRD_REQUIRED:
        for field in CRD_REQUIRED[key]:
            assert _get(obj, field) not in (None, ""), f"{where}: {key[1]} lacks {field}"
        return
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(f"{where}: {key[1]} {obj['metadata'].get('name')}: {exc}") from None


def test_raw_manifests_match_the_schemas() -> None:
    objs = _raw_objects()
    assert len(objs) >= 10
    for path, obj in objs:
        _validate(obj, str(path.relative_to(ROOT)))


def test_rendered_manifests_match_the_schemas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for where, objs in rendered.items():
        assert objs, where
        for obj in objs:
            _validate(obj, f"{where} (rendered)")


def test_unknown_kind_is_caught() -> None:
    # The validator is live: a typo in a built-in field fails.
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 1, "targetPrt": 2}]},
    }
    with pytest.raises(AssertionError, match="targetPrt"):
        _validate(bad, "test")


def test_yamllint_is_clean() -> None:
    conf = YamlLintConfig(file=str(ROOT / ".yamllint.yaml"))
    problems = []
    for path in _yaml_files():
        for p in linter.run(path.read_text(), conf, str(path)):
            problems.append(f"{path.relative_to(ROOT)}:{p.line}:{p.column}: {p.desc} ({p.rule})")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------
# What the manifests must get right.


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_agents_probe_health_on_the_api_port(rendered, overlay: str) -> None:
    for ds in _daemonsets(rendered[f"kubernetes/overlays/{overlay}"]):
        agent = _container(ds, "meshd")
        api_port = _flags(agent)["--api"][0].rsplit(":", 1)[1]
        ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = agent[probe]["httpGet"]
            assert get["path"] == "/v1/health", (ds["metadata"]["name"], probe)
            assert str(ports.get(get["port"], get["port"])) == api_port, (probe, get)
        assert ds["spec"]["template"]["spec"]["hostNetwork"] is True
        ann = ds["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert ann["prometheus.io/port"] == api_port and ann["prometheus.io/path"] == "/metrics"
        res = agent["resources"]
        assert res["requests"]["memory"] and res["limits"]["memory"] and res["requests"]["cpu"]
        assert ds["spec"]["updateStrategy"] == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 1},
        }


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_api_token_comes_from_the_secret(rendered, overlay: str) -> None:
    for ds in _daemonsets(rendered[f"kubernetes/overlays/{overlay}"]):
        agent = _container(ds, "meshd")
        token_file = _flags(agent)["--api-token-file"][0]
        # The agent reads the token from a memory volume...
        mount = _mount_of(agent, token_file)
        vol = _volume(ds, mount["name"])
        assert vol.get("emptyDir", {}).get("medium") == "Memory", vol
        # ...that the prepare step fills, as a 0600 file of the agent's user,
        # from the Secret meshd-api-token.
        prepare = _container(ds, "prepare", init=True)
        script = " ".join(prepare["command"])
        copy = f"install -o 10001 -g 10001 -m 0600 /etc/meshd/secret/token {token_file}"
        assert copy in script, script
        assert _mount_of(prepare, token_file)["name"] == mount["name"]
        secret_vol = _volume(ds, _mount_of(prepare, "/etc/meshd/secret/token")["name"])
        assert secret_vol["secret"]["secretName"] == "meshd-api-token"
        assert agent["securityContext"]["runAsUser"] == 10001
        # Off loopback the agent refuses to start without a token file.
        assert not _flags(agent)["--api"][0].startswith("127.")


def test_node_reader_role_allows_only_get_on_nodes(rendered) -> None:
    objs = rendered["kubernetes/overlays/east"]
    roles = [o for o in objs if o["kind"] in ("ClusterRole", "Role")]
    assert [r["metadata"]["name"] for r in roles] == ["meshd-node-reader"]
    assert roles[0]["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    binding = _find(objs, "ClusterRoleBinding", "meshd-node-reader")
    assert binding["roleRef"]["name"] == "meshd-node-reader"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "meshd", "namespace": "meshd"}
    ]
    for ds in _daemonsets(objs):
        assert ds["spec"]["template"]["spec"]["serviceAccountName"] == "meshd"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_bridges_run_on_labelled_nodes_behind_the_wan_service(rendered, overlay: str) -> None:
    objs = rendered[f"kubernetes/overlays/{overlay}"]
    members = _find(objs, "DaemonSet", "meshd")
    bridges = _find(objs, "DaemonSet", "meshd-bridge")
    assert bridges["spec"]["template"]["spec"]["nodeSelector"] == {"meshd.io/bridge": "true"}
    # Members stay off bridge nodes: two host-network agents would share ports.
    terms = members["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert terms == [
        {"matchExpressions": [{"key": "meshd.io/bridge", "operator": "NotIn", "values": ["true"]}]}
    ]
    assert "--wan-bind" not in _flags(_container(members, "meshd"))
    agent = _container(bridges, "meshd")
    flags = _flags(agent)
    wan_port = int(flags["--wan-bind"][0].rsplit(":", 1)[1])
    assert flags["--wan-join"], "a bridge must know another cluster's bridges"
    svc = _find(objs, "Service", "meshd-wan")
    labels = bridges["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert (
        not svc["spec"]["selector"].items()
        <= members["spec"]["template"]["metadata"]["labels"].items()
    )
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    (port,) = svc["spec"]["ports"]
    named = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert named.get(port["targetPort"], port["targetPort"]) == wan_port
    # The bridge advertises <node address>:<the Service's node port>.
    env = {e["name"]: e.get("value") for e in _container(bridges, "locality", init=True)["env"]}
    assert env["MESHD_WAN_PORT"] == str(port["nodePort"])
    # Never all bridges at once.
    assert bridges["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    pdb = _find(objs, "PodDisruptionBudget", "meshd-bridge")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # The API Service reaches both kinds of agent, on their own node only.
    api = _find(objs, "Service", "meshd-api")
    assert api["spec"]["internalTrafficPolicy"] == "Local"
    for ds in (members, bridges):
        assert (
            api["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
        )


def test_the_other_clusters_are_joined(rendered) -> None:
    wan = {}
    for name in OVERLAYS:
        objs = rendered[f"kubernetes/overlays/{name}"]
        bridges = _find(objs, "DaemonSet", "meshd-bridge")
        wan[name] = _flags(_container(bridges, "meshd"))["--wan-join"]
        cm = next(o for o in objs if o["metadata"]["name"].startswith("meshd-cluster"))
        assert cm["data"] == {"cluster": name, "trust-domain": TRUST_DOMAIN}
    assert wan["east"] != wan["west"]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_certificates_name_the_pod_in_this_cluster(rendered, overlay: str) -> None:
    objs = rendered[f"kubernetes/overlays/{overlay}"]
    _find(objs, "Issuer", "meshd-ca")
    for ds in _daemonsets(objs):
        attrs = _volume(ds, "tls")["csi"]["volumeAttributes"]
        assert _volume(ds, "tls")["csi"]["driver"] == "csi.cert-manager.io"
        assert attrs["csi.cert-manager.io/issuer-name"] == "meshd-ca"
        assert attrs["csi.cert-manager.io/issuer-kind"] == "Issuer"
        uris = attrs["csi.cert-manager.io/uri-sans"].split(",")
        domain, cluster, node = parse_spiffe_uri(uris[0].replace("${POD_NAME}", "pod-x1"))
        assert (domain, cluster, node) == (TRUST_DOMAIN, overlay, "pod-x1")
        # The driver expands only these; any other ${...} fails the mount.
        template_vars = {"POD_NAME", "POD_NAMESPACE", "POD_UID", "SERVICE_ACCOUNT_NAME"}
        assert "${POD_NAME}" in uris[0] and all(
            v in template_vars for v in _template_vars(",".join(attrs.values()))
        )
        bridge = ds["metadata"]["name"] == "meshd-bridge"
        assert (BRIDGE_ROLE_URI in uris) is bridge
        # meshd takes ECDSA P-256 or Ed25519; the driver's default is RSA.
        assert attrs["csi.cert-manager.io/key-algorithm"] == "ECDSA"
        assert attrs["csi.cert-manager.io/key-size"] == "256"
        usages = attrs["csi.cert-manager.io/key-usages"].split(",")
        assert {"server auth", "client auth"} <= set(usages)
        assert attrs["csi.cert-manager.io/fs-group"] == "10001"
        assert _parse_hours(attrs["csi.cert-manager.io/renew-before"]) < _parse_hours(
            attrs["csi.cert-manager.io/duration"]
        )
        agent = _container(ds, "meshd")
        flags = _flags(agent)
        assert flags["--node"] == ["$(POD_NAME)"]
        assert flags["--cluster"] == ["$(MESHD_CLUSTER)"]
        tls = {f: flags[f"--tls-{f}"][0] for f in ("ca", "cert", "key")}
        assert tls == {
            "ca": "/run/meshd/tls/ca.crt",
            "cert": "/run/meshd/tls/tls.crt",
            "key": "/run/meshd/tls/tls.key",
        }
        assert _mount_of(agent, tls["cert"])["name"] == "tls"


def _template_vars(text: str) -> list[str]:
    return re.findall(r"\$\{([^}]*)\}", text) + re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", text)


def _parse_hours(text: str) -> int:
    assert text.endswith("h"), text
    return int(text[:-1])


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_agent_flag_is_one_meshd_accepts(rendered, overlay: str) -> None:
    parser = build_parser()
    for ds in _daemonsets(rendered[f"kubernetes/overlays/{overlay}"]):
        agent = _container(ds, "meshd")
        env = {e["name"] for e in agent["env"]}
        expanded = []
        for arg in agent["args"]:
            # $(VAR) is the kubelet's expansion: each must be a variable it defines.
            for var in _kubelet_vars(arg):
                assert var in env, f"{arg}: ${var} is not in the container's env"
            expanded.append(_fake_expand(arg))
        ns = parser.parse_args(expanded)  # exits 2 (SystemExit) on an unknown flag
        assert ns.command == "agent"


def test_an_unknown_flag_is_caught() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["agent", "--wan-advertize=1.2.3.4:1"])


def _kubelet_vars(arg: str) -> list[str]:
    return re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg)


def _fake_expand(arg: str) -> str:
    values = {"HOST_IP": "10.0.0.4", "POD_NAME": "meshd-x1", "NODE_NAME": "n1"}
    return re.sub(r"\$\(([A-Za-z_]+)\)", lambda m: values.get(m.group(1), "east"), arg)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_policy_is_a_watched_directory_mount(rendered, overlay: str, tmp_path: Path) -> None:
    objs = rendered[f"kubernetes/overlays/{overlay}"]
    cm = _find(objs, "ConfigMap", "meshd-policy")  # no hash suffix: edited in place
    for ds in _daemonsets(objs):
        agent = _container(ds, "meshd")
        policy = _flags(agent)["--policy"][0]
        mount = _mount_of(agent, policy)
        assert "subPath" not in mount, "a subPath mount never sees a ConfigMap edit"
        assert _volume(ds, mount["name"])["configMap"]["name"] == "meshd-policy"
        assert Path(policy).name in cm["data"]
    # The policy itself is one the agent accepts.
    (tmp_path / "policy.toml").write_text(cm["data"]["policy.toml"])
    load_policy_file(tmp_path / "policy.toml")


async def test_policy_watcher_sees_a_configmap_update(tmp_path: Path) -> None:
    """The kubelet updates a ConfigMap volume by a symlink swap, as here."""
    first, second = tmp_path / "..2026_01_01_a", tmp_path / "..2026_01_01_b"
    first.mkdir()
    (first / "policy.toml").write_text('failover = ["east"]\n')
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "policy.toml").symlink_to("..data/policy.toml")
    seen: list[Any] = []
    agent = SimpleNamespace(set_policy=seen.append)
    cfg = SimpleNamespace(policy_file=tmp_path / "policy.toml")
    task = asyncio.create_task(agent_run._watch_policy(cast(Any, cfg), cast(Any, agent)))
    try:
        await asyncio.sleep(agent_run.POLICY_POLL_INTERVAL * 2)
        assert seen == []
        # Same size, new content, in a new directory; then the atomic swap.
        second.mkdir()
        (second / "policy.toml").write_text('failover = ["west"]\n')
        (tmp_path / "..data_tmp").symlink_to(second.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        shutil.rmtree(first)
        for _ in range(40):
            if seen:
                break
            await asyncio.sleep(agent_run.POLICY_POLL_INTERVAL / 2)
        assert seen, "the watcher missed the symlink swap"
        assert seen[-1].default.failover == ("west",)
    finally:
        task.cancel()


# ---------------------------------------------------------------------------
# The locality init script, against a fake API server over TLS.


def _locality() -> ModuleType:
    spec = importlib.util.spec_from_file_location("meshd_locality", K8S / "base" / "locality.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _node(labels: dict[str, Any], addresses: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": "n1", "labels": labels},
        "status": {"addresses": addresses},
    }


REGION = "topology.kubernetes.io/region"
ZONE = "topology.kubernetes.io/zone"


def test_locality_toml_from_labels() -> None:
    loc = _locality()
    text = loc.locality_toml(_node({REGION: "us-east", ZONE: "us-east-1a"}, []), None)
    assert tomllib.loads(text) == {"region": "us-east", "zone": "us-east-1a"}
    # Missing labels: no region or zone, not an empty one.
    assert tomllib.loads(loc.locality_toml(_node({}, []), None)) == {}
    addrs = [{"type": "InternalIP", "address": "10.0.0.4"}]
    wan = tomllib.loads(loc.locality_toml(_node({}, addrs), 30302))
    assert wan == {"wan_advertise": "10.0.0.4:30302"}
    addrs.append({"type": "ExternalIP", "address": "203.0.113.7"})
    wan = tomllib.loads(loc.locality_toml(_node({}, addrs), 30302))
    assert wan == {"wan_advertise": "203.0.113.7:30302"}
    v6 = [{"type": "InternalIP", "address": "fd00::4"}]
    assert tomllib.loads(loc.locality_toml(_node({}, v6), 1))["wan_advertise"] == "[fd00::4]:1"


@pytest.mark.parametrize(
    "labels, addresses, port",
    [
        ({REGION: 'x"\nnode = "evil'}, [], None),
        ({ZONE: "a b"}, [], None),
        ({ZONE: 7}, [], None),
        ({}, [], 30302),
        ({}, [{"type": "InternalIP", "address": "not-an-ip"}], 30302),
    ],
)
def test_locality_refuses_what_is_not_a_name(labels, addresses, port) -> None:
    loc = _locality()
    with pytest.raises(loc.LocalityError):
        loc.locality_toml(_node(labels, addresses), port)


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[SimpleNamespace]:
    """An HTTPS server on 127.0.0.1 answering GET /api/v1/nodes/NAME from ``nodes``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (sa / "token").write_text("sa-token\n")
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    state = SimpleNamespace(nodes={}, requests=[], sa=sa, port=0, out=tmp_path / "loc.toml")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append((self.path, self.headers.get("Authorization")))
            name = self.path.removeprefix("/api/v1/nodes/")
            if self.headers.get("Authorization") != "Bearer sa-token":
                self.send_response(401)
                self.end_headers()
                return
            body = state.nodes.get(name)
            if body is None:
                self.send_response(404)
                self.end_headers()
                return
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(sa / "ca.crt", tmp_path / "key.pem")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _run_locality(api: SimpleNamespace, monkeypatch, node: str = "n1", wan: str = "") -> int:
    loc = _locality()
    monkeypatch.setattr(loc, "RETRY_DELAY", 0.0)
    for k, v in {
        "NODE_NAME": node,
        "MESHD_LOCALITY_FILE": str(api.out),
        "MESHD_WAN_PORT": wan,
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(api.port),
        "MESHD_SA_DIR": str(api.sa),
    }.items():
        monkeypatch.setenv(k, v)
    return cast(int, loc.main())


def test_locality_init_reads_its_node(api_server, monkeypatch, capsys) -> None:
    addrs = [{"type": "InternalIP", "address": "10.0.0.4"}]
    api_server.nodes["n1"] = _node({REGION: "us-east", ZONE: "us-east-1b"}, addrs)
    assert _run_locality(api_server, monkeypatch, wan="30302") == 0
    assert tomllib.loads(api_server.out.read_text()) == {
        "region": "us-east",
        "zone": "us-east-1b",
        "wan_advertise": "10.0.0.4:30302",
    }
    assert api_server.requests == [("/api/v1/nodes/n1", "Bearer sa-token")]
    # The file is one the agent's config loader takes, as it is.
    args = ["agent", "--dev", "--wan-bind=127.0.0.1:0", "--config", str(api_server.out)]
    cfg = load_config(vars(build_parser().parse_args(args)))
    assert (cfg.region, cfg.zone) == ("us-east", "us-east-1b")
    assert cfg.wan_advertise == ("10.0.0.4", 30302)


def test_locality_init_fails_in_one_line(api_server, monkeypatch, capsys) -> None:
    api_server.nodes["big"] = b"x" * (8 * 1024 * 1024 + 10)
    api_server.nodes["list"] = {"kind": "NodeList", "items": []}
    for node, why in [("n9", "HTTP 404"), ("big", "over"), ("list", "not a Node")]:
        assert _run_locality(api_server, monkeypatch, node=node) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("meshd-locality: error: ") and why in err, err
        assert "\n" not in err
        assert not api_server.out.exists()
