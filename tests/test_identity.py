"""Tests for meshd.identity: CA and node certificates, SPIFFE IDs, signed origin states.

Every time used here is a fixed ``NOW``; nothing depends on the wall clock.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.identity import (
    CA,
    CLOCK_SKEW,
    IdentityError,
    NodeCert,
    StateSigner,
    StateVerifier,
    create_ca,
    issue_node_cert,
    load_ca,
    load_node_cert,
    parse_spiffe_uri,
    spiffe_id,
    verify_peer_certificate,
    write_ca,
    write_node_cert,
)
from meshd.wire import (
    AppRecord,
    MemberClaim,
    OriginState,
    Rejection,
    SignedClaim,
    SignedState,
    Status,
)

NOW = datetime(2025, 1, 1, tzinfo=UTC)


def make_state(node: str = "n1", cluster: str = "east", version: int = 3) -> OriginState:
    return OriginState(
        node=node,
        cluster=cluster,
        region="us-east",
        zone="us-east-1a",
        version=version,
        apps=(AppRecord(app="orders", instance="o-1", address="127.0.0.1", port=3500),),
    )


def sign_by_hand(
    nc: NodeCert,
    body: bytes,
    origin: str = "east/n1",
    version: int = 3,
) -> SignedState:
    """A SignedState built around StateSigner's checks, to forge on purpose."""
    if isinstance(nc.key, ed25519.Ed25519PrivateKey):
        sig = nc.key.sign(body)
    else:
        sig = nc.key.sign(body, ec.ECDSA(hashes.SHA256()))
    return SignedState(origin=origin, version=version, body=body, signature=sig, cert=nc.cert_der)


def rejection(out: OriginState | Rejection) -> str:
    """Why the verifier refused; the test fails when it accepted."""
    assert isinstance(out, Rejection), f"accepted {out}"
    return out.reason


def key_bytes(key: object) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def mode_of(path: os.PathLike[str]) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def ca() -> CA:
    return create_ca(now=NOW)


@pytest.fixture(scope="module")
def other_ca() -> CA:
    # Same trust domain and subject: only the key tells it apart.
    return create_ca(now=NOW)


@pytest.fixture(scope="module")
def east(ca: CA) -> NodeCert:
    return issue_node_cert(ca, "n1", "east", ips=["127.0.0.1"], dns=["n1.east.local"], now=NOW)


@pytest.fixture(scope="module")
def verifier(ca: CA) -> StateVerifier:
    return StateVerifier(ca.cert, "mesh.local")


# ---------------------------------------------------------------------------
# SPIFFE IDs.


def test_spiffe_id_roundtrip() -> None:
    uri = spiffe_id("mesh.local", "east", "n1")
    assert uri == "spiffe://mesh.local/cluster/east/node/n1"
    assert parse_spiffe_uri(uri) == ("mesh.local", "east", "n1")


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "https://mesh.local/cluster/east/node/n1",
        "spiffe://mesh.local/cluster/east",
        "spiffe://mesh.local/cluster/east/node/n1/extra",
        "spiffe://Mesh.Local/cluster/east/node/n1",
        "spiffe://mesh.local/cluster/-east/node/n1",
        "spiffe://mesh.local/cluster/east/node/n1\n",
        "spiffe:///cluster/east/node/n1",
    ],
)
def test_parse_spiffe_uri_rejects_malformed(uri: str) -> None:
    with pytest.raises(IdentityError):
        parse_spiffe_uri(uri)


@pytest.mark.parametrize(
    ("domain", "cluster", "node"),
    [("Mesh", "east", "n1"), ("mesh.local", "ea/st", "n1"), ("mesh.local", "east", "")],
)
def test_spiffe_id_rejects_bad_parts(domain: str, cluster: str, node: str) -> None:
    with pytest.raises(IdentityError):
        spiffe_id(domain, cluster, node)


def test_identity_error_is_value_error() -> None:
    assert issubclass(IdentityError, ValueError)


# ---------------------------------------------------------------------------
# The CA.


def test_ca_has_the_promised_extensions(ca: CA) -> None:
    ext = ca.cert.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is True and bc.path_length == 0
    ku = ext.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://mesh.local"]
    cn = ca.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "meshd CA mesh.local"
    assert isinstance(ca.key, ed25519.Ed25519PrivateKey)
    assert ca.cert.not_valid_before_utc == NOW - CLOCK_SKEW
    assert ca.cert.not_valid_after_utc == NOW + timedelta(days=3650)


def test_ca_write_load_roundtrip_with_private_key_mode(ca: CA, tmp_path) -> None:
    cert_path, key_path = write_ca(ca, tmp_path / "ca")
    assert (cert_path.name, key_path.name) == ("ca.pem", "ca.key")
    assert mode_of(key_path) == 0o600
    loaded = load_ca(tmp_path / "ca")
    assert loaded.cert == ca.cert
    assert key_bytes(loaded.key) == key_bytes(ca.key)
    assert loaded.trust_domain == "mesh.local"
    # Nothing left over from the write-then-rename.
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == ["ca.key", "ca.pem"]


def test_ca_key_is_created_private_not_chmodded_later(ca: CA, tmp_path, monkeypatch) -> None:
    opened: list[tuple[str, int]] = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs):
        opened.append((os.fspath(path), mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    monkeypatch.setattr(os, "chmod", lambda *a, **k: pytest.fail("chmod used"))
    write_ca(ca, tmp_path)
    assert any(p.endswith(".tmp") and ".ca.key." in p and m == 0o600 for p, m in opened)


def test_write_ca_refuses_to_overwrite_a_key(ca: CA, tmp_path) -> None:
    write_ca(ca, tmp_path)
    fresh = create_ca(now=NOW)
    with pytest.raises(IdentityError, match="already exists"):
        write_ca(fresh, tmp_path)
    assert key_bytes(load_ca(tmp_path).key) == key_bytes(ca.key)
    write_ca(fresh, tmp_path, overwrite=True)
    assert key_bytes(load_ca(tmp_path).key) == key_bytes(fresh.key)
    assert mode_of(tmp_path / "ca.key") == 0o600


def test_ecdsa_ca_and_custom_domain(tmp_path) -> None:
    ca = create_ca("corp.example", days=10, now=NOW, key_type="ecdsa-p256")
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)
    write_ca(ca, tmp_path)
    assert load_ca(tmp_path).trust_domain == "corp.example"


def test_create_ca_rejects_bad_arguments() -> None:
    with pytest.raises(IdentityError, match="key type"):
        create_ca(key_type="rsa")
    with pytest.raises(IdentityError, match="trust domain"):
        create_ca("Not A Domain")
    with pytest.raises(IdentityError, match="days"):
        create_ca(days=0)


def test_load_ca_missing_key_names_the_file(ca: CA, tmp_path) -> None:
    write_ca(ca, tmp_path)
    (tmp_path / "ca.key").unlink()
    with pytest.raises(IdentityError, match=r"ca\.key does not exist"):
        load_ca(tmp_path)


def test_load_ca_mismatched_key(ca: CA, other_ca: CA, tmp_path) -> None:
    write_ca(ca, tmp_path)
    write_ca(other_ca, tmp_path / "other")
    os.replace(tmp_path / "other" / "ca.key", tmp_path / "ca.key")
    with pytest.raises(IdentityError, match=r"ca\.key does not match"):
        load_ca(tmp_path)


def test_load_ca_garbage_files(ca: CA, tmp_path) -> None:
    write_ca(ca, tmp_path)
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(IdentityError, match=r"ca\.pem holds no PEM certificate"):
        load_ca(tmp_path)
    write_ca(ca, tmp_path, overwrite=True)
    (tmp_path / "ca.key").write_text("not a key\n")
    with pytest.raises(IdentityError, match=r"ca\.key holds no PEM private key"):
        load_ca(tmp_path)


def test_load_ca_refuses_a_leaf(east: NodeCert, tmp_path) -> None:
    (tmp_path / "ca.pem").write_bytes(east.cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.key").write_bytes(
        east.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(IdentityError, match="not a CA certificate"):
        load_ca(tmp_path)


# ---------------------------------------------------------------------------
# Node certificates.


def test_node_cert_names_and_extensions(ca: CA, east: NodeCert) -> None:
    assert east.member_id == "east/n1"
    assert (east.trust_domain, east.cluster, east.node) == ("mesh.local", "east", "n1")
    ext = east.cert.extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://mesh.local/cluster/east/node/n1"
    ]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["n1.east.local"]
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    cn = east.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "n1"
    assert east.cert.issuer == ca.cert.subject
    assert east.cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert east.cert.not_valid_after_utc == NOW + timedelta(days=365)
    assert east.cert_der == east.cert.public_bytes(serialization.Encoding.DER)


def test_node_cert_never_outlives_its_ca(ca: CA) -> None:
    nc = issue_node_cert(ca, "n2", "east", days=365, now=NOW + timedelta(days=3600))
    assert nc.cert.not_valid_after_utc == ca.cert.not_valid_after_utc


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ips": ["not-an-ip"]}, "not an IP address"),
        ({"dns": ["bad name"]}, "not a DNS name"),
        ({"key_type": "rsa"}, "key type"),
        ({"node": "n/1"}, "node"),
        ({"now": NOW + timedelta(days=4000)}, "CA expired"),
    ],
)
def test_issue_node_cert_rejects_bad_arguments(ca: CA, kwargs: dict, match: str) -> None:
    args = {"node": "n1", "cluster": "east", **kwargs}
    with pytest.raises(IdentityError, match=match):
        issue_node_cert(ca, **args)


def test_node_cert_write_load_roundtrip(ca: CA, east: NodeCert, tmp_path) -> None:
    write_ca(ca, tmp_path)
    cert_path, key_path = write_node_cert(east, tmp_path)
    assert (cert_path.name, key_path.name) == ("n1.pem", "n1.key")
    assert mode_of(key_path) == 0o600
    chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
    assert chain == [east.cert, ca.cert]
    loaded = load_node_cert(cert_path, key_path, tmp_path / "ca.pem", now=NOW)
    assert loaded.cert == east.cert
    assert loaded.ca_cert == ca.cert
    assert key_bytes(loaded.key) == key_bytes(east.key)
    assert (loaded.trust_domain, loaded.member_id) == ("mesh.local", "east/n1")


@pytest.mark.parametrize("ca_key", ["ed25519", "ecdsa-p256"])
@pytest.mark.parametrize("leaf_key", ["ed25519", "ecdsa-p256"])
def test_both_key_types_issue_load_sign_verify(ca_key: str, leaf_key: str, tmp_path) -> None:
    ca = create_ca(now=NOW, key_type=ca_key)
    nc = issue_node_cert(ca, "n1", "east", ips=["127.0.0.1"], key_type=leaf_key, now=NOW)
    ca_path, _ = write_ca(ca, tmp_path)
    loaded = load_node_cert(*write_node_cert(nc, tmp_path), ca_path)
    signed = StateSigner(loaded).sign(make_state())
    assert StateVerifier([ca.cert], "mesh.local").verify(signed, now=NOW) == make_state()


def test_load_node_cert_missing_file(ca: CA, east: NodeCert, tmp_path) -> None:
    ca_path, _ = write_ca(ca, tmp_path)
    _, key_path = write_node_cert(east, tmp_path)
    with pytest.raises(IdentityError, match=r"certificate .*nope\.pem does not exist"):
        load_node_cert(tmp_path / "nope.pem", key_path, ca_path)


def test_load_node_cert_key_not_matching(ca: CA, east: NodeCert, tmp_path) -> None:
    ca_path, _ = write_ca(ca, tmp_path)
    cert_path, _ = write_node_cert(east, tmp_path)
    _, other_key = write_node_cert(issue_node_cert(ca, "n2", "east", now=NOW), tmp_path)
    with pytest.raises(IdentityError, match=r"key .*n2\.key does not match certificate"):
        load_node_cert(cert_path, other_key, ca_path)


def test_load_node_cert_from_another_ca(other_ca: CA, east: NodeCert, tmp_path) -> None:
    ca_path, _ = write_ca(other_ca, tmp_path)
    cert_path, key_path = write_node_cert(east, tmp_path)
    with pytest.raises(IdentityError, match=r"n1\.pem is not signed by the CA"):
        load_node_cert(cert_path, key_path, ca_path)


def test_load_node_cert_accepts_a_bundle_of_cas(
    ca: CA, other_ca: CA, east: NodeCert, tmp_path
) -> None:
    bundle = tmp_path / "cas.pem"
    bundle.write_bytes(
        other_ca.cert.public_bytes(serialization.Encoding.PEM)
        + ca.cert.public_bytes(serialization.Encoding.PEM)
    )
    loaded = load_node_cert(*write_node_cert(east, tmp_path), bundle)
    assert loaded.ca_cert == ca.cert


def test_load_node_cert_checks_validity_when_asked(ca: CA, east: NodeCert, tmp_path) -> None:
    ca_path, _ = write_ca(ca, tmp_path)
    paths = write_node_cert(east, tmp_path)
    with pytest.raises(IdentityError, match="expired at"):
        load_node_cert(*paths, ca_path, now=NOW + timedelta(days=366))


# ---------------------------------------------------------------------------
# Signing and verifying.


def test_sign_verify_roundtrip(east: NodeCert, verifier: StateVerifier) -> None:
    signed = StateSigner(east).sign(make_state())
    assert (signed.origin, signed.version) == ("east/n1", 3)
    assert signed.body == make_state().encode()
    assert signed.cert == east.cert_der
    assert verifier.verify(signed) == make_state()
    assert verifier.verify(signed, now=NOW) == make_state()


def test_signer_refuses_another_nodes_state(east: NodeCert) -> None:
    signer = StateSigner(east)
    with pytest.raises(IdentityError, match="cannot sign"):
        signer.sign(make_state(node="n2"))
    with pytest.raises(IdentityError, match="cannot sign"):
        signer.sign(make_state(cluster="west"))


def test_altered_body_is_bad_signature(east: NodeCert, verifier: StateVerifier) -> None:
    signed = StateSigner(east).sign(make_state())
    body = bytearray(signed.body)
    body[-1] ^= 0x01
    forged = SignedState(signed.origin, signed.version, bytes(body), signed.signature, signed.cert)
    assert rejection(verifier.verify(forged)) == "bad-signature"


def test_garbage_signature_is_bad_signature(east: NodeCert, verifier: StateVerifier) -> None:
    signed = StateSigner(east).sign(make_state())
    forged = SignedState(signed.origin, signed.version, signed.body, b"\x00" * 7, signed.cert)
    assert rejection(verifier.verify(forged)) == "bad-signature"


def test_east_cert_claiming_west_is_cluster_mismatch(
    east: NodeCert, verifier: StateVerifier
) -> None:
    body = make_state(cluster="west").encode()
    signed = sign_by_hand(east, body, origin="west/n1")
    assert rejection(verifier.verify(signed)) == "cluster-mismatch"


def test_other_node_name_is_node_mismatch(east: NodeCert, verifier: StateVerifier) -> None:
    signed = sign_by_hand(east, make_state(node="n2").encode(), origin="east/n2")
    assert rejection(verifier.verify(signed)) == "node-mismatch"


@pytest.mark.parametrize(("origin", "version"), [("east/n9", 3), ("east/n1", 4)])
def test_unsigned_copies_must_agree_with_body(
    east: NodeCert, verifier: StateVerifier, origin: str, version: int
) -> None:
    signed = sign_by_hand(east, make_state().encode(), origin=origin, version=version)
    assert rejection(verifier.verify(signed)) == "origin-mismatch"


def test_signed_garbage_is_malformed(east: NodeCert, verifier: StateVerifier) -> None:
    assert rejection(verifier.verify(sign_by_hand(east, b"\x93\x01\x02"))) == "malformed"


def test_cert_from_another_ca_is_untrusted(other_ca: CA, verifier: StateVerifier) -> None:
    intruder = issue_node_cert(other_ca, "n1", "east", now=NOW)
    signed = StateSigner(intruder).sign(make_state())
    assert rejection(verifier.verify(signed)) == "untrusted-cert"


def test_garbage_cert_is_bad_cert(east: NodeCert, verifier: StateVerifier) -> None:
    signed = StateSigner(east).sign(make_state())
    forged = SignedState(signed.origin, signed.version, signed.body, signed.signature, b"junk")
    assert rejection(verifier.verify(forged)) == "bad-cert"


def test_other_trust_domain_is_bad_cert(ca: CA, east: NodeCert) -> None:
    signed = StateSigner(east).sign(make_state())
    assert rejection(StateVerifier(ca.cert, "other.local").verify(signed)) == "bad-cert"


def test_cert_without_node_spiffe_id_is_bad_cert(ca: CA, verifier: StateVerifier) -> None:
    # The CA's own certificate chains to itself but names no node.
    ca_as_node = NodeCert(ca.cert, ca.key, ca.cert, "mesh.local", "east", "n1")
    signed = sign_by_hand(ca_as_node, make_state().encode())
    assert rejection(verifier.verify(signed)) == "bad-cert"


@pytest.mark.parametrize(
    ("when", "detail"),
    [(NOW + timedelta(days=366), "expired at"), (NOW - timedelta(hours=1), "not valid before")],
)
def test_expired_or_early_cert_with_now(
    east: NodeCert, verifier: StateVerifier, when: datetime, detail: str
) -> None:
    signed = StateSigner(east).sign(make_state())
    got = verifier.verify(signed, now=when)
    assert isinstance(got, Rejection)
    assert got.reason == "expired-cert"
    assert detail in got.detail
    # Without a clock the validity period is not checked.
    assert verifier.verify(signed) == make_state()


def test_clock_check_comes_before_signature_check(east: NodeCert, verifier: StateVerifier) -> None:
    signed = StateSigner(east).sign(make_state())
    forged = SignedState(signed.origin, signed.version, signed.body, b"\x00" * 64, signed.cert)
    assert rejection(verifier.verify(forged, now=NOW + timedelta(days=400))) == "expired-cert"


def test_verifier_trusts_any_of_several_cas(ca: CA, other_ca: CA, east: NodeCert) -> None:
    signed = StateSigner(east).sign(make_state())
    assert StateVerifier([other_ca.cert, ca.cert], "mesh.local").verify(signed) == make_state()


# ---------------------------------------------------------------------------
# Caching.


def test_repeat_verify_hits_the_cache(ca: CA, east: NodeCert) -> None:
    v = StateVerifier(ca.cert, "mesh.local")
    signed = StateSigner(east).sign(make_state())
    assert v.verify(signed) == make_state()
    assert (v.hits, v.misses) == (0, 1)
    for _ in range(3):
        assert v.verify(signed) == make_state()
    assert (v.hits, v.misses) == (3, 1)


def test_cache_hit_still_checks_clock_and_copies(ca: CA, east: NodeCert) -> None:
    v = StateVerifier(ca.cert, "mesh.local")
    signed = StateSigner(east).sign(make_state())
    assert v.verify(signed, now=NOW) == make_state()
    assert rejection(v.verify(signed, now=NOW + timedelta(days=400))) == "expired-cert"
    relabelled = SignedState("east/n1", 9, signed.body, signed.signature, signed.cert)
    assert rejection(v.verify(relabelled)) == "origin-mismatch"
    assert v.hits == 2


def test_signed_rejections_are_cached_but_forgeable_ones_are_not(ca: CA, east: NodeCert) -> None:
    v = StateVerifier(ca.cert, "mesh.local")
    mismatch = sign_by_hand(east, make_state(cluster="west").encode(), origin="west/n1")
    v.verify(mismatch)
    assert rejection(v.verify(mismatch)) == "cluster-mismatch"
    assert v.hits == 1
    signed = StateSigner(east).sign(make_state())
    forged = SignedState(signed.origin, signed.version, signed.body, b"\x00" * 64, signed.cert)
    v.verify(forged)
    assert rejection(v.verify(forged)) == "bad-signature"
    assert v.hits == 1


def test_cache_is_bounded_lru(ca: CA, east: NodeCert) -> None:
    v = StateVerifier(ca.cert, "mesh.local", cache_size=1)
    signer = StateSigner(east)
    first, second = signer.sign(make_state(version=1)), signer.sign(make_state(version=2))
    v.verify(first)
    v.verify(second)  # evicts first
    v.verify(first)
    assert (v.hits, v.misses) == (0, 3)
    v.verify(first)
    assert v.hits == 1


def test_cache_size_zero_disables_caching(ca: CA, east: NodeCert) -> None:
    v = StateVerifier(ca.cert, "mesh.local", cache_size=0)
    signed = StateSigner(east).sign(make_state())
    assert v.verify(signed) == v.verify(signed) == make_state()
    assert (v.hits, v.misses) == (0, 2)


# ---------------------------------------------------------------------------
# Peer certificates and hostile input.


def test_verify_peer_certificate(ca: CA, other_ca: CA, east: NodeCert) -> None:
    assert verify_peer_certificate(east.cert_der, [ca.cert], "mesh.local") == ("east", "n1")
    assert verify_peer_certificate(east.cert_der, ca.cert, "mesh.local", now=NOW) == (
        "east",
        "n1",
    )
    with pytest.raises(IdentityError, match="untrusted-cert"):
        verify_peer_certificate(east.cert_der, other_ca.cert, "mesh.local")
    with pytest.raises(IdentityError, match="bad-cert"):
        verify_peer_certificate(b"\x30\x03\x02\x01\x00", ca.cert, "mesh.local")
    with pytest.raises(IdentityError, match="bad-cert"):
        verify_peer_certificate(east.cert_der, ca.cert, "other.local")
    with pytest.raises(IdentityError, match="expired-cert"):
        verify_peer_certificate(east.cert_der, ca.cert, "mesh.local", now=NOW + timedelta(999))


def test_every_single_byte_flip_of_the_cert_is_rejected(
    east: NodeCert, verifier: StateVerifier
) -> None:
    signed = StateSigner(east).sign(make_state())
    der = signed.cert
    for i in range(len(der)):
        flipped = der[:i] + bytes([der[i] ^ 0x55]) + der[i + 1 :]
        got = verifier.verify(SignedState("east/n1", 3, signed.body, signed.signature, flipped))
        assert isinstance(got, Rejection), i
        assert got.reason in ("bad-cert", "untrusted-cert"), (i, got)


@settings(max_examples=60, derandomize=True, deadline=None)
@given(
    body=st.binary(max_size=200),
    signature=st.binary(max_size=80),
    cert=st.one_of(st.binary(max_size=300), st.just(b"")),
    keep=st.sampled_from(["body", "signature", "cert"]),
)
def test_verify_never_raises_on_peer_bytes(
    east: NodeCert, verifier: StateVerifier, body: bytes, signature: bytes, cert: bytes, keep: str
) -> None:
    real = StateSigner(east).sign(make_state())
    # Keep one genuine field so the later checks get exercised, not only the parser.
    fields = {"body": body, "signature": signature, "cert": cert, keep: getattr(real, keep)}
    signed = SignedState("east/n1", 3, fields["body"], fields["signature"], fields["cert"])
    assert isinstance(verifier.verify(signed, now=NOW), Rejection)


# ---------------------------------------------------------------------------
# Member claims, the bridge role, the verifier's clock and revocation.


def test_a_claim_verifies_for_its_own_member_only(ca: CA, east: NodeCert) -> None:
    v = StateVerifier(ca.cert, ca.trust_domain)
    claim = MemberClaim(Status.ALIVE, "east/n1", 7, "127.0.0.1:7946", "r1", "z1")
    signed = StateSigner(east).sign_claim(claim)
    assert v.verify_claim(signed, now=NOW) == claim
    # A certificate of another node cannot vouch for east/n1's incarnation.
    other = issue_node_cert(ca, "n2", "east", now=NOW)
    forged = SignedClaim(signed.body, sign_by_hand(other, signed.body).signature, other.cert_der)
    rejected = v.verify_claim(forged, now=NOW)
    assert isinstance(rejected, Rejection) and rejected.reason == "node-mismatch"
    junk = SignedClaim(signed.body, b"\0" * 64, signed.cert)
    rejected = v.verify_claim(junk, now=NOW)
    assert isinstance(rejected, Rejection) and rejected.reason == "bad-signature"
    with pytest.raises(IdentityError):
        StateSigner(other).sign_claim(claim)


def test_statements_about_others_need_the_bridge_role(ca: CA) -> None:
    v = StateVerifier(ca.cert, ca.trust_domain)
    plain = issue_node_cert(ca, "n3", "east", now=NOW)
    bridge = issue_node_cert(ca, "b1", "east", now=NOW, bridge=True)
    assert bridge.bridge and not plain.bridge
    lie = OriginState("n3", "east", "", "", 5, down=(("east/n1", 2**63 - 1),))
    rejected = v.verify(StateSigner(plain).sign(lie), now=NOW)
    assert isinstance(rejected, Rejection) and rejected.reason == "not-bridge"
    for field in (
        {"bridge": True},
        {"unreachable": ("west",)},
        {"rtt": (("west", 5),)},
        {"left": ("east/n1",)},
    ):
        doc = OriginState("n3", "east", "", "", 6, **field)
        out = v.verify(StateSigner(plain).sign(doc), now=NOW)
        assert isinstance(out, Rejection) and out.reason == "not-bridge"
    said = OriginState("b1", "east", "", "", 5, bridge=True, down=(("east/n1", 3),))
    assert v.verify(StateSigner(bridge).sign(said), now=NOW) == said


def test_the_verifier_clock_refuses_expired_signers(ca: CA) -> None:
    nc = issue_node_cert(ca, "n4", "east", days=1, now=NOW)
    signed = StateSigner(nc).sign(make_state("n4"))
    clock = [NOW]
    v = StateVerifier(ca.cert, ca.trust_domain, clock=lambda: clock[0])
    assert isinstance(v.verify(signed), OriginState)
    assert v.current(signed.cert) is None
    clock[0] = NOW + timedelta(days=3)  # cached outcome or not, the clock is asked again
    expired = v.verify(signed)
    assert isinstance(expired, Rejection) and expired.reason == "expired-cert"
    assert v.current(signed.cert) == expired


def test_revoked_serials_are_refused(ca: CA) -> None:
    nc = issue_node_cert(ca, "n5", "east", now=NOW)
    revoked: set[int] = set()
    v = StateVerifier(ca.cert, ca.trust_domain, revoked=revoked.__contains__)
    signed = StateSigner(nc).sign(make_state("n5"))
    assert isinstance(v.verify(signed, now=NOW), OriginState)
    revoked.add(nc.serial)
    out = v.verify(signed, now=NOW)
    assert isinstance(out, Rejection) and out.reason == "revoked-cert"
    with pytest.raises(IdentityError, match="revoked"):
        verify_peer_certificate(nc.cert_der, ca.cert, ca.trust_domain, revoked=revoked.__contains__)
