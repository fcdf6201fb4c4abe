"""meshd.agent.config: flags over file over defaults, and one-line errors naming the culprit."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from meshd import identity
from meshd.agent import config as config_mod
from meshd.agent.config import AgentConfig, ConfigError, load_config, parse_hostport
from meshd.cli import main

# ---------------------------------------------------------------------------
# Helpers.


def raises_config(flags: dict[str, Any], *fragments: str) -> str:
    """load_config fails with one line containing every fragment; returns the message."""
    with pytest.raises(ConfigError) as info:
        load_config(flags)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA and a certificate for east/n1, as `meshd cert issue` writes them."""
    root = tmp_path_factory.mktemp("pki")
    ca = identity.create_ca("mesh.test")
    ca_pem, _ = identity.write_ca(ca, root / "ca")
    cert, key = identity.write_node_cert(
        identity.issue_node_cert(ca, node="n1", cluster="east"), root / "certs"
    )
    return {"root": root, "ca": ca_pem, "cert": cert, "key": key}


@pytest.fixture
def tls_flags(pki: dict[str, Path], tmp_path: Path) -> dict[str, Any]:
    return {
        "tls_ca": str(pki["ca"]),
        "tls_cert": str(pki["cert"]),
        "tls_key": str(pki["key"]),
        "state_dir": str(tmp_path / "state"),
    }


def write_toml(tmp_path: Path, text: str, name: str = "meshd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------
# parse_hostport.


@pytest.mark.parametrize(
    ("value", "default_port", "expected"),
    [
        ("127.0.0.1:7946", None, ("127.0.0.1", 7946)),
        ("node-1.example.com:80", None, ("node-1.example.com", 80)),
        ("localhost:0", None, ("localhost", 0)),
        ("h:65535", None, ("h", 65535)),
        ("[::1]:7946", None, ("::1", 7946)),
        ("[fe80::1]:0", None, ("fe80::1", 0)),
        ("192.0.2.1", 7946, ("192.0.2.1", 7946)),
        ("[::1]", 7946, ("::1", 7946)),
        ("::1", 7946, ("::1", 7946)),
        ("example.org:7000", 7946, ("example.org", 7000)),
    ],
)
def test_parse_hostport_accepts(
    value: str, default_port: int | None, expected: tuple[str, int]
) -> None:
    assert parse_hostport(value, "--bind", default_port) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("nonsense", "needs a port"),
        ("h:65536", "0 to 65535"),
        ("h:-1", "0 to 65535"),
        ("h:abc", "0 to 65535"),
        ("h:+5", "0 to 65535"),
        ("h:\u0661\u0662", "0 to 65535"),  # Arabic-Indic digits: int() would take them
        ("h:", "0 to 65535"),
        (":7946", "HOST:PORT"),
        ("", "HOST:PORT"),
        (" h:1", "HOST:PORT"),
        ("a b:1", "HOST:PORT"),
        ("::1:80", "brackets"),
        ("[::1", "unclosed"),
        ("[::1]80", "HOST:PORT"),
        ("[host]:80", "not an IPv6 address"),
    ],
)
def test_parse_hostport_refuses(value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_hostport(value, "--bind")
    msg = str(info.value)
    assert msg.startswith("--bind ") and fragment in msg and "\n" not in msg


# ---------------------------------------------------------------------------
# Defaults.


def test_dev_defaults_need_nothing() -> None:
    cfg = load_config({"dev": True})
    assert cfg.dev is True
    assert cfg.bind == ("127.0.0.1", 7946)
    assert cfg.api == ("127.0.0.1", 7700)
    assert cfg.profile == "local"
    assert (cfg.tls_ca, cfg.tls_cert, cfg.tls_key) == (None, None, None)
    assert cfg.state_dir is None and cfg.policy_file is None and cfg.policy_table is None
    assert cfg.cluster == "default" and cfg.log_level == "info" and cfg.join == ()
    assert cfg.config_file is None


def test_production_defaults(tls_flags: dict[str, Any]) -> None:
    cfg = load_config(tls_flags)
    assert cfg.dev is False
    assert cfg.bind == ("0.0.0.0", 7946)
    assert cfg.api == ("127.0.0.1", 7700)
    assert cfg.profile == "lan"
    # Unset names come from the certificate, which is the node's identity.
    assert (cfg.cluster, cfg.node) == ("east", "n1")
    assert cfg.tls_cert == Path(tls_flags["tls_cert"])


def test_development_constructor_and_invariants() -> None:
    cfg = AgentConfig.development(node="a")
    assert cfg.dev and cfg.bind == ("127.0.0.1", 7946) and cfg.profile == "local"
    assert cfg.replace(zone="z1").zone == "z1"
    with pytest.raises(ConfigError, match="tls_ca is required unless dev"):
        AgentConfig(node="a")
    with pytest.raises(ConfigError, match="node must be"):
        AgentConfig.development(node="bad name")
    with pytest.raises(ConfigError, match="profile"):
        AgentConfig.development(profile="fast")
    with pytest.raises(ConfigError, match="bind"):
        AgentConfig.development(bind=("127.0.0.1", 70000))
    with pytest.raises(ConfigError, match="all three or none"):
        AgentConfig.development(tls_ca=Path("ca.pem"))


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [("web-1.example.com", "web-1.example.com"), ("my host_1!", "my-host_1"), ("---", "node")],
)
def test_node_defaults_to_sanitized_hostname(
    monkeypatch: pytest.MonkeyPatch, hostname: str, expected: str
) -> None:
    monkeypatch.setattr("meshd.agent.config.socket.gethostname", lambda: hostname)
    assert load_config({"dev": True}).node == expected


# ---------------------------------------------------------------------------
# The file and precedence.


def test_file_then_flags(tmp_path: Path, pki: dict[str, Path]) -> None:
    (tmp_path / "policy.toml").write_text("")
    path = write_toml(
        tmp_path,
        f"""
node = "n1"
cluster = "east"
region = "us-east"
zone = "us-east-1a"
bind = "192.0.2.5:7000"
advertise = "192.0.2.1:7000"
join = ["192.0.2.6", "[fd00::7]:7001"]
api = "127.0.0.1:7800"
state_dir = "state"
profile = "wan"
log_level = "debug"

[tls]
ca = "{pki["ca"]}"
cert = "{pki["cert"]}"
key = "{pki["key"]}"

[policy]
prefer = ["zone", "region"]
""",
    )
    cfg = load_config({"config": str(path)})
    assert cfg.config_file == path
    assert (cfg.node, cfg.cluster, cfg.region, cfg.zone) == ("n1", "east", "us-east", "us-east-1a")
    assert cfg.bind == ("192.0.2.5", 7000)
    assert cfg.advertise == ("192.0.2.1", 7000)
    # Defaulted port filled in, IPv6 bracketed, so the agent gets uniform strings.
    assert cfg.join == ("192.0.2.6:7946", "[fd00::7]:7001")
    assert cfg.api == ("127.0.0.1", 7800)
    # Relative paths in the file are relative to the file.
    assert cfg.state_dir == tmp_path / "state"
    assert (cfg.profile, cfg.log_level) == ("wan", "debug")
    assert cfg.policy_table == {"prefer": ["zone", "region"]} and cfg.policy_file is None

    overridden = load_config(
        {
            "config": str(path),
            "bind": "127.0.0.1:0",
            "join": ["192.0.2.99:1"],
            "zone": "us-east-1b",
            "profile": "lan",
            "policy": str(tmp_path / "policy.toml"),
            "state_dir": "elsewhere",
            "region": None,  # not given: the file's value stands
        }
    )
    assert overridden.bind == ("127.0.0.1", 0)
    assert overridden.join == ("192.0.2.99:1",)  # a flag list replaces the file's list
    assert overridden.zone == "us-east-1b" and overridden.region == "us-east"
    assert overridden.profile == "lan"
    # --policy FILE replaces the file's [policy] table.
    assert overridden.policy_file == tmp_path / "policy.toml"
    assert overridden.policy_table is None
    # Flag paths are relative to the working directory, not the file.
    assert overridden.state_dir == Path("elsewhere")


def test_file_relative_tls_paths_and_policy_path(tmp_path: Path, pki: dict[str, Path]) -> None:
    path = write_toml(
        pki["root"],
        'state_dir = "s"\npolicy = "ca/ca.pem"\n[tls]\nca = "ca/ca.pem"\n'
        'cert = "certs/n1.pem"\nkey = "certs/n1.key"\n',
        name="rel.toml",
    )
    cfg = load_config({"config": str(path)})
    assert cfg.tls_cert == pki["cert"] and cfg.tls_ca == pki["ca"]
    assert cfg.policy_file == pki["ca"]


def test_dev_in_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "dev = true\n")
    cfg = load_config({"config": str(path), "dev": None})
    assert cfg.dev and cfg.bind == ("127.0.0.1", 7946) and cfg.profile == "local"


# ---------------------------------------------------------------------------
# Every error path: one line, naming the key, flag or file.


def test_config_file_problems(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    raises_config({"config": str(missing)}, f"config file {missing} does not exist")
    raises_config({"config": str(tmp_path)}, f"config file {tmp_path}")
    bad = write_toml(tmp_path, 'node = "a"\nbind = \n')
    msg = raises_config({"config": str(bad)}, f"config file {bad} is not valid TOML", "line 2")
    assert "column" in msg
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'node = "caf\xe9"\n')
    raises_config({"config": str(latin)}, "not valid UTF-8")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('foo = "x"\n', ("unknown key 'foo'",)),
        ('clustr = "x"\n', ("unknown key 'clustr'", "did you mean 'cluster'")),
        ("[extra]\na = 1\n", ("unknown key 'extra'",)),
        ('[tls]\ncrt = "x"\n', ("unknown key 'tls.crt'", "did you mean 'cert'")),
        ("bind = 7946\n", ("key 'bind' must be a string",)),
        ('join = "192.0.2.1"\n', ("key 'join' must be a list of strings",)),
        ("join = [1, 2]\n", ("key 'join' must be a list of strings",)),
        ('dev = "yes"\n', ("key 'dev' must be true or false",)),
        ("policy = 3\n", ("key 'policy' must be a string or a table",)),
        ('tls = "x"\n', ("key 'tls' must be a table",)),
        ("[tls]\ncert = 1\n", ("key 'tls.cert' must be a string",)),
    ],
)
def test_file_keys_and_types(tmp_path: Path, text: str, fragments: tuple[str, ...]) -> None:
    path = write_toml(tmp_path, text)
    raises_config({"config": str(path), "dev": True}, f"config file {path}: ", *fragments)


def test_bad_values_name_flag_or_key(tmp_path: Path) -> None:
    raises_config({"dev": True, "node": "bad name"}, "--node must be", "'bad name'")
    raises_config({"dev": True, "zone": "-x"}, "--zone must be")
    raises_config({"dev": True, "bind": "nonsense:99999"}, "--bind port")
    raises_config({"dev": True, "api": "[::1"}, "--api has an unclosed")
    raises_config({"dev": True, "join": ["ok:1", "bad host:1"]}, "--join must be HOST:PORT")
    raises_config({"dev": True, "join": ["h:0"]}, "--join 'h:0' has port 0")
    raises_config({"dev": True, "advertise": "0.0.0.0:7946"}, "--advertise must be an address")
    raises_config({"dev": True, "wan_join": ["h:1"]}, "--wan-join needs --wan-bind")
    raises_config({"dev": True, "profile": "fast"}, "--profile must be one of lan, wan, local")
    raises_config({"dev": True, "log_level": "loud"}, "--log-level must be one of")

    path = write_toml(tmp_path, 'node = "bad name"\nbind = "x:y"\n')
    raises_config({"config": str(path), "dev": True}, f"config file {path}: key 'node' must be")
    # The flag fixes the node; the file's bind is next in line and named as the file's.
    raises_config(
        {"config": str(path), "dev": True, "node": "ok"},
        f"config file {path}: key 'bind' port must be",
    )
    path = write_toml(tmp_path, 'profile = "fast"\n', name="p.toml")
    raises_config({"config": str(path), "dev": True}, "key 'profile' must be one of")


def test_tls_required_unless_dev(tmp_path: Path, tls_flags: dict[str, Any]) -> None:
    base = {"state_dir": str(tmp_path)}
    raises_config(base, "--tls-ca is required unless --dev")
    raises_config(base | {"tls_ca": tls_flags["tls_ca"]}, "--tls-cert is required unless --dev")
    flags = base | {"tls_ca": tls_flags["tls_ca"], "tls_cert": tls_flags["tls_cert"]}
    raises_config(flags, "--tls-key is required unless --dev")
    # In dev they may be omitted, but not half given.
    raises_config(
        {"dev": True, "tls_cert": tls_flags["tls_cert"]}, "--tls-ca is required when --tls-cert"
    )
    no_state = dict(tls_flags, state_dir=None)
    raises_config(no_state, "--state-dir is required unless --dev")


def test_tls_files_named_when_unusable(tmp_path: Path, tls_flags: dict[str, Any]) -> None:
    gone = tmp_path / "gone.pem"
    raises_config(tls_flags | {"tls_cert": str(gone)}, f"--tls-cert file {gone} does not exist")
    raises_config(tls_flags | {"tls_key": str(tmp_path)}, f"--tls-key file {tmp_path} is a dir")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    raises_config(tls_flags | {"tls_ca": str(junk)}, str(junk), "no PEM certificate")
    # A certificate for another node is refused before anything starts.
    raises_config(tls_flags | {"node": "n2"}, "--node is 'n2'", "is for node 'n1'")
    raises_config(tls_flags | {"cluster": "west"}, "--cluster is 'west'", "cluster 'east'")


def test_state_dir_and_policy_problems(tmp_path: Path, tls_flags: dict[str, Any]) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    raises_config(tls_flags | {"state_dir": str(a_file)}, f"--state-dir {a_file} is not a dir")
    gone = tmp_path / "policy.toml"
    raises_config({"dev": True, "policy": str(gone)}, f"--policy file {gone} does not exist")


def test_extra_flags_are_ignored() -> None:
    # argparse's namespace carries "command" and "func"; load_config takes it whole.
    cfg = load_config({"dev": True, "command": "agent", "func": print})
    assert cfg.dev


# ---------------------------------------------------------------------------
# Through main(): exit 2, one line on stderr, nothing started.


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch) -> list[AgentConfig]:
    """Stands in for meshd.agent.run so these tests never start an agent."""
    calls: list[AgentConfig] = []

    def run_agent(cfg: AgentConfig) -> int:
        calls.append(cfg)
        return 0

    module = types.ModuleType("meshd.agent.run")
    module.run_agent = run_agent  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "meshd.agent.run", module)
    return calls


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--dev", "--bind", "nonsense:port"], "--bind port must be"),
        (["--dev", "--bind", "nonsense"], None),  # a bare host is fine: port defaults
        (["--bind", "127.0.0.1:7946"], "--state-dir is required unless --dev"),
        (["--dev", "--config", "/nonexistent/meshd.toml"], "does not exist"),
        (["--dev", "--node", "a/b"], "--node must be"),
    ],
)
def test_agent_config_errors_via_main(
    capsys: pytest.CaptureFixture[str],
    fake_run: list[AgentConfig],
    argv: list[str],
    fragment: str | None,
) -> None:
    code = main(["agent", *argv])
    out, err = capsys.readouterr()
    if fragment is None:
        assert code == 0 and len(fake_run) == 1 and fake_run[0].bind == ("nonsense", 7946)
        return
    assert code == 2
    assert fake_run == []
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("meshd: error: ") and fragment in err


def test_agent_usage_error_is_one_line(
    capsys: pytest.CaptureFixture[str], fake_run: list[AgentConfig]
) -> None:
    assert main(["agent", "--profile", "fast"]) == 2
    assert main(["agent", "--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2
    assert "argument --profile: invalid choice: 'fast'" in err
    assert "unrecognized arguments: --no-such-flag" in err
    assert fake_run == []


def test_agent_passes_config_to_run_agent(
    tmp_path: Path, fake_run: list[AgentConfig], tls_flags: dict[str, Any]
) -> None:
    path = write_toml(tmp_path, 'zone = "z1"\njoin = ["192.0.2.1:7946"]\n')
    argv = ["agent", "--config", str(path), "--join", "192.0.2.2", "--join", "192.0.2.3:1"]
    argv += ["--tls-ca", tls_flags["tls_ca"], "--tls-cert", tls_flags["tls_cert"]]
    argv += ["--tls-key", tls_flags["tls_key"], "--state-dir", str(tmp_path / "s")]
    argv += ["--wan-bind", "127.0.0.1:0", "--api", "127.0.0.1:0", "--log-level", "debug"]
    assert main(argv) == 0
    (cfg,) = fake_run
    assert cfg.zone == "z1" and cfg.node == "n1" and cfg.cluster == "east"
    assert cfg.join == ("192.0.2.2:7946", "192.0.2.3:1")
    assert cfg.wan_bind == ("127.0.0.1", 0) and cfg.api == ("127.0.0.1", 0)
    assert cfg.log_level == "debug" and cfg.dev is False


# ---------------------------------------------------------------------------
# The API token file and the loopback rule.

TOKEN = "q5bXc0fN/7+k=="


def token_file(tmp_path: Path, content: str | bytes = f"  {TOKEN}\n\n", name: str = "t") -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


def test_api_token_file_from_flag_and_from_file(tmp_path: Path) -> None:
    path = token_file(tmp_path)
    cfg = load_config({"dev": True, "api_token_file": str(path)})
    # Surrounding whitespace (the newline an editor or echo adds) is not the token.
    assert cfg.api_token == TOKEN and cfg.api_token_file == path
    assert TOKEN not in repr(cfg)  # a logged config never shows the token

    # In the file the path is relative to the file, as every path there is.
    (tmp_path / "etc").mkdir()
    token_file(tmp_path / "etc", "other-token\n", name="api-token")
    conf = write_toml(tmp_path / "etc", 'dev = true\napi_token_file = "api-token"\n')
    cfg = load_config({"config": str(conf)})
    assert cfg.api_token == "other-token"
    assert cfg.api_token_file == tmp_path / "etc" / "api-token"
    # The flag wins over the file.
    assert load_config({"config": str(conf), "api_token_file": str(path)}).api_token == TOKEN


def test_api_tls_from_flag_and_from_file(tmp_path: Path) -> None:
    assert load_config({"dev": True}).api_tls is False
    assert load_config({"dev": True, "api_tls": True}).api_tls is True
    conf = write_toml(tmp_path, "dev = true\napi_tls = true\n")
    assert load_config({"config": str(conf)}).api_tls is True
    bad = write_toml(tmp_path, 'dev = true\napi_tls = "yes"\n')
    with pytest.raises(ConfigError, match="api_tls"):
        load_config({"config": str(bad)})


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "does not exist"),
        ("", "is empty; write a token into it, for example with head -c 32 /dev/urandom"),
        (" \n\t \r\n", "is empty"),
        ("two words", "holds a space, a control character or a non-ASCII character"),
        ("line1\nline2", "holds a space"),
        ("tok\x00en", "holds a space"),
        ("caf\u00e9", "non-ASCII"),
        (b"\xff\xfe", "non-ASCII"),
        ("x" * (config_mod.MAX_TOKEN_BYTES + 1), "is larger than 1024 bytes"),
    ],
)
def test_bad_api_token_files(tmp_path: Path, content: str | bytes | None, fragment: str) -> None:
    path = tmp_path / "t" if content is None else token_file(tmp_path, content)
    raises_config({"dev": True, "api_token_file": str(path)}, f"--api-token-file file {path} ")
    raises_config({"dev": True, "api_token_file": str(path)}, fragment)
    conf = write_toml(tmp_path, f'dev = true\napi_token_file = "{path}"\n')
    raises_config({"config": str(conf)}, f"config file {conf}: key 'api_token_file' file {path}")


def test_api_token_file_that_is_a_directory_or_unreadable(tmp_path: Path) -> None:
    raises_config({"dev": True, "api_token_file": str(tmp_path)}, "is a directory")
    # Unreadable even for root: a path through a regular file.
    path = token_file(tmp_path) / "token"
    raises_config(
        {"dev": True, "api_token_file": str(path)},
        f"cannot read --api-token-file file {path}: Not a directory",
    )


@pytest.mark.parametrize(
    "api", ["0.0.0.0:7700", "192.0.2.7:7700", "[::]:7700", "[fd00::1]:1", "meshd.example:7700",
            "[::ffff:192.0.2.1]:1", "10.0.0.1"],
)  # fmt: skip
def test_api_off_loopback_needs_a_token(tmp_path: Path, api: str) -> None:
    msg = raises_config({"dev": True, "api": api}, "is not a loopback address", "--api-token-file")
    host, port = parse_hostport(api, "api", 7700)
    assert msg.startswith(f"--api {config_mod.format_hostport(host, port)} ")
    cfg = load_config({"dev": True, "api": api, "api_token_file": str(token_file(tmp_path))})
    assert cfg.api == (host, port) and cfg.api_token == TOKEN
    # Named as the file's key when the file sets it.
    conf = write_toml(tmp_path, f'dev = true\napi = "{api}"\n')
    raises_config({"config": str(conf)}, f"config file {conf}: key 'api' ", "--api-token-file")


@pytest.mark.parametrize(
    "api", ["127.0.0.1:7700", "127.3.2.1:0", "[::1]:7700", "localhost:7700", "LocalHost.:1",
            "[::ffff:127.0.0.1]:7700"],
)  # fmt: skip
def test_api_on_loopback_needs_no_token(api: str) -> None:
    assert load_config({"dev": True, "api": api}).api_token is None


def test_is_loopback_and_direct_construction() -> None:
    assert config_mod.is_loopback("127.255.0.1") and config_mod.is_loopback("::1")
    assert not config_mod.is_loopback("0.0.0.0") and not config_mod.is_loopback("localhost.lan")
    with pytest.raises(ConfigError, match="api 0.0.0.0:7700 is not a loopback address"):
        AgentConfig.development(api=("0.0.0.0", 7700))
    cfg = AgentConfig.development(api=("0.0.0.0", 7700), api_token=TOKEN)
    assert cfg.api_token == TOKEN
    with pytest.raises(ConfigError, match="api_token holds a space"):
        AgentConfig.development(api_token="a b")


def test_agent_off_loopback_via_main(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fake_run: list[AgentConfig],
    tls_flags: dict[str, Any],
) -> None:
    argv = ["agent", "--tls-ca", tls_flags["tls_ca"], "--tls-cert", tls_flags["tls_cert"]]
    argv += ["--tls-key", tls_flags["tls_key"], "--state-dir", str(tmp_path / "s")]
    argv += ["--api", "0.0.0.0:7700"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("meshd: error: --api 0.0.0.0:7700 ")
    assert "--api-token-file" in err and fake_run == []

    assert main([*argv, "--api-token-file", str(token_file(tmp_path))]) == 0
    (cfg,) = fake_run
    assert cfg.api == ("0.0.0.0", 7700) and cfg.api_token == TOKEN


def test_a_wildcard_bind_is_never_advertised(monkeypatch: pytest.MonkeyPatch) -> None:
    """LAN and WAN alike: peers cannot dial 0.0.0.0, so the host's own address goes out."""
    from meshd.agent import run

    monkeypatch.setattr("meshd.agent.run.socket.gethostbyname", lambda name: "192.0.2.7")
    assert run._advertise_of(None, ("0.0.0.0", 7000)) == "192.0.2.7:7000"
    assert run._advertise_of(("198.51.100.1", 0), ("0.0.0.0", 7000)) == "198.51.100.1:7000"
    assert run._advertise_of(None, ("127.0.0.1", 7000)) == "127.0.0.1:7000"
