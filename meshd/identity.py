"""Identity and trust: the CA, node certificates, SPIFFE IDs, signed origin states.

Theory of operation
-------------------
There is one root CA per trust domain.  Its certificate names the domain in a
URI SAN ``spiffe://<trust-domain>`` and may sign only leaves (path length 0).
Each node holds a leaf whose single SPIFFE URI SAN is
``spiffe://<trust-domain>/cluster/<c>/node/<n>``.  That ID is the node's
identity everywhere: a TLS peer is known by it (:func:`verify_peer_certificate`),
and so is the author of an origin state.

A node publishes its origin state as a :class:`~meshd.wire.SignedState`: the
canonical body (``OriginState.encode()``), a signature over exactly those bytes
made with the node's key, and the node's leaf certificate.  The signature binds
the whole body (node, cluster, region, zone, version, every app record) to a
key the CA vouched for.  The copies of origin and version outside the body are
not signed, so the verifier checks that they agree with it.  The certificate
travels with the state, so a state is verified against its origin and never
against the neighbour that relayed it: a relay can drop a state but cannot
alter or forge one.

The author's cluster and node come from the certificate, never from the body.
A state is accepted only if its body names the cluster and node of the
certificate that signed it.  Otherwise a node of cluster east could publish
records "from" cluster west, a bridge could plant records in any cluster it
relays to, and every cluster-scoped rule of the policy layer (exports,
failover) would be meaningless.

Peer input never raises: :meth:`StateVerifier.verify` returns a
:class:`~meshd.wire.Rejection` naming the reason.  Our own misuse (a bad name,
a missing or mismatched file, signing another node's state) raises
:class:`IdentityError`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshd import wire
from meshd.files import write_atomic
from meshd.wire import MemberClaim, OriginState, Rejection, SignedClaim, SignedState

_K = TypeVar("_K")
_V = TypeVar("_V")
_T = TypeVar("_T")

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey

KEY_TYPES = ("ed25519", "ecdsa-p256")
DEFAULT_TRUST_DOMAIN = "mesh.local"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
#: notBefore is backdated by this much, so a peer whose clock runs a little
#: behind the issuer's accepts a certificate issued a moment ago.
CLOCK_SKEW = timedelta(minutes=5)
#: X.509 caps a common name at 64 characters.  The CN is only a label for
#: humans; identity lives in the URI SAN, so a long name is cut, not refused.
_MAX_CN = 64

# SPIFFE allows lowercase letters, digits, '.', '-' and '_' in a trust domain.
_TRUST_DOMAIN = r"[a-z0-9._\-]{1,255}"
# Path segments are further checked by wire.check_name; this only keeps '/'
# and anything outside the name alphabet from reaching it.
_SEGMENT = r"[A-Za-z0-9_.\-]+"
SPIFFE_PATTERN = re.compile(
    rf"\Aspiffe://(?P<trust_domain>{_TRUST_DOMAIN})"
    rf"/cluster/(?P<cluster>{_SEGMENT})/node/(?P<node>{_SEGMENT})\Z"
)
_TRUST_DOMAIN_RE = re.compile(rf"\A{_TRUST_DOMAIN}\Z")
_CA_URI_RE = re.compile(rf"\Aspiffe://(?P<trust_domain>{_TRUST_DOMAIN})\Z")
#: A URI SAN that marks a node certificate as a bridge's: only such a node's
#: statements about its cluster (members down as of a version, clusters
#: unreachable, round trips) are believed.  A URI, not an X.509 extension,
#: so that any issuer that can set URI SANs (cert-manager included) can grant it.
BRIDGE_ROLE_URI = "urn:meshd:role:bridge"
_DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
_DNS_RE = re.compile(rf"\A(\*\.)?{_DNS_LABEL}(\.{_DNS_LABEL})*\.?\Z")


class IdentityError(ValueError):
    """A certificate, key or identity that cannot be used: our misuse or a bad file."""


# ---------------------------------------------------------------------------
# SPIFFE IDs.


def _check_trust_domain(trust_domain: object) -> str:
    if not isinstance(trust_domain, str) or not _TRUST_DOMAIN_RE.match(trust_domain):
        raise IdentityError(
            "a trust domain is 1-255 lowercase letters, digits, '.', '-' or '_'"
            f", not {trust_domain!r:.80}"
        )
    return trust_domain


def _check_name(value: object, what: str) -> str:
    try:
        return wire.check_name(value, what)
    except wire.WireError as exc:
        raise IdentityError(str(exc)) from None


def spiffe_id(trust_domain: str, cluster: str, node: str) -> str:
    """The SPIFFE ID of a node: ``spiffe://<trust-domain>/cluster/<c>/node/<n>``."""
    _check_trust_domain(trust_domain)
    _check_name(cluster, "cluster")
    _check_name(node, "node")
    return f"spiffe://{trust_domain}/cluster/{cluster}/node/{node}"


def parse_spiffe_uri(uri: str) -> tuple[str, str, str]:
    """``spiffe://<td>/cluster/<c>/node/<n>`` -> (trust domain, cluster, node)."""
    m = SPIFFE_PATTERN.match(uri) if isinstance(uri, str) else None
    if m is None:
        raise IdentityError(
            f"{uri!r:.120} is not a node SPIFFE ID spiffe://<trust-domain>/cluster/<c>/node/<n>"
        )
    return m["trust_domain"], _check_name(m["cluster"], "cluster"), _check_name(m["node"], "node")


# ---------------------------------------------------------------------------
# Keys and small helpers.


def _generate_key(key_type: str) -> PrivateKey:
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise IdentityError(f"key type must be one of {', '.join(KEY_TYPES)}, not {key_type!r:.40}")


def _cert_hash(key: PrivateKey) -> hashes.SHA256 | None:
    # Ed25519 hashes internally; cryptography insists on None for it.
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _sign(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def _signature_ok(public_key: PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
        else:
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _usable_public_key(key: object) -> PublicKey | None:
    # Only what we issue: a cert with any other key is refused rather than
    # verified with an algorithm nobody here chose.
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    return None


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _utc(now: datetime | None) -> datetime:
    # A naive datetime is taken as UTC: the simulator's virtual clock need not
    # carry a zone, and certificate times are UTC.
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


def _check_days(days: object) -> int:
    if not isinstance(days, int) or isinstance(days, bool) or days < 1:
        raise IdentityError(f"days must be a positive integer, not {days!r:.40}")
    return days


def _common_name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text[:_MAX_CN])])


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return san.value.get_values_for_type(x509.UniformResourceIdentifier)


def _ca_trust_domain(cert: x509.Certificate) -> str | None:
    for uri in _uri_sans(cert):
        m = _CA_URI_RE.match(uri)
        if m:
            return m["trust_domain"]
    return None


def _leaf_identity(cert: x509.Certificate) -> tuple[str, str, str]:
    # SPIFFE: an SVID carries exactly one SPIFFE ID; two would make "who signed
    # this" ambiguous.
    ids = [u for u in _uri_sans(cert) if u.startswith("spiffe://")]
    if len(ids) != 1:
        raise IdentityError(f"certificate has {len(ids)} SPIFFE URI SANs, expected exactly one")
    return parse_spiffe_uri(ids[0])


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _find_issuer(
    cert: x509.Certificate, ca_certs: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    for ca in ca_certs:
        try:
            # Checks issuer name and the signature with the CA's public key, for
            # Ed25519 and ECDSA alike.
            cert.verify_directly_issued_by(ca)
        except Exception:  # wrong name, wrong key, unsupported algorithm: not this CA
            continue
        return ca
    return None


def _ca_list(ca_certs: Sequence[x509.Certificate] | x509.Certificate) -> list[x509.Certificate]:
    cas = [ca_certs] if isinstance(ca_certs, x509.Certificate) else list(ca_certs)
    if not cas or not all(isinstance(c, x509.Certificate) for c in cas):
        raise IdentityError("at least one CA certificate is needed")
    return cas


# ---------------------------------------------------------------------------
# Files.


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    try:
        write_atomic(path, data, mode)
    except OSError as exc:
        raise IdentityError(f"cannot write {path}: {exc.strerror or exc}") from None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise IdentityError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _load_certs(path: Path, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise IdentityError(f"{what} {path} holds no PEM certificate") from None


def _load_key(path: Path, what: str) -> PrivateKey:
    data = _read(path, what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise IdentityError(f"{what} {path} is encrypted; meshd needs an unencrypted key") from None
    except Exception:
        raise IdentityError(f"{what} {path} holds no PEM private key") from None
    if isinstance(key, ed25519.Ed25519PrivateKey) or (
        isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    ):
        return key
    raise IdentityError(f"{what} {path} is neither an Ed25519 nor an ECDSA P-256 key")


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _check_window(cert: x509.Certificate, now: datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise IdentityError(
            f"{what} is not valid until {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    if now > cert.not_valid_after_utc:
        raise IdentityError(f"{what} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


# ---------------------------------------------------------------------------
# The CA.


@dataclass(frozen=True)
class CA:
    """The root of one trust domain: its self-signed certificate and signing key."""

    cert: x509.Certificate
    key: PrivateKey
    trust_domain: str


def create_ca(
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    days: int = 3650,
    now: datetime | None = None,
    key_type: str = "ed25519",
) -> CA:
    """A new self-signed CA for ``trust_domain``, valid for ``days`` from ``now``."""
    _check_trust_domain(trust_domain)
    _check_days(days)
    key = _generate_key(key_type)
    start = _utc(now).replace(microsecond=0)
    name = _common_name(f"meshd CA {trust_domain}")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + timedelta(days=days))
        # Path length 0: the CA signs node leaves only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _cert_hash(key))
    )
    return CA(cert=cert, key=key, trust_domain=trust_domain)


def write_ca(ca: CA, out_dir: str | os.PathLike[str], overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``ca.pem`` and ``ca.key`` (mode 0600) into ``out_dir``; returns both paths.

    An existing ``ca.key`` is kept unless ``overwrite``: replacing it silently
    would orphan every certificate the old CA issued.
    """
    out = Path(out_dir)
    cert_path, key_path = out / CA_CERT_FILE, out / CA_KEY_FILE
    if key_path.exists() and not overwrite:
        raise IdentityError(f"CA key {key_path} already exists; refusing to overwrite it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IdentityError(f"cannot create directory {out}: {exc.strerror or exc}") from None
    # Certificate first: a crash between the two leaves no new key behind, so a
    # rerun is not refused.
    _write_atomic(cert_path, _cert_pem(ca.cert), 0o644)
    _write_atomic(key_path, _key_pem(ca.key), 0o600)
    return cert_path, key_path


def load_ca(directory: str | os.PathLike[str]) -> CA:
    """Read ``ca.pem`` and ``ca.key`` from ``directory``; the trust domain comes from the cert."""
    d = Path(directory)
    cert_path, key_path = d / CA_CERT_FILE, d / CA_KEY_FILE
    cert = _load_certs(cert_path, "CA certificate")[0]
    key = _load_key(key_path, "CA key")
    if not _is_ca(cert):
        raise IdentityError(f"CA certificate {cert_path} is not a CA certificate")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise IdentityError(f"CA key {key_path} does not match CA certificate {cert_path}")
    trust_domain = _ca_trust_domain(cert)
    if trust_domain is None:
        raise IdentityError(f"CA certificate {cert_path} has no spiffe://<trust-domain> URI SAN")
    return CA(cert=cert, key=key, trust_domain=trust_domain)


# ---------------------------------------------------------------------------
# Node certificates.


@dataclass(frozen=True)
class NodeCert:
    """A node's leaf certificate and key, the CA cert that signed it, and who it names."""

    cert: x509.Certificate
    key: PrivateKey
    ca_cert: x509.Certificate
    trust_domain: str
    cluster: str
    node: str

    @property
    def member_id(self) -> str:
        return wire.member_id(self.cluster, self.node)

    @property
    def bridge(self) -> bool:
        """Whether the CA granted this node the bridge role (see BRIDGE_ROLE_URI)."""
        return BRIDGE_ROLE_URI in _uri_sans(self.cert)

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    @cached_property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise IdentityError(f"{value!r:.60} is not an IP address") from None


def _dns(value: object) -> str:
    if not isinstance(value, str) or len(value) > 253 or not _DNS_RE.match(value):
        raise IdentityError(f"{value!r:.60} is not a DNS name")
    return value


def issue_node_cert(
    ca: CA,
    node: str,
    cluster: str,
    ips: Iterable[str] = (),
    dns: Iterable[str] = (),
    days: int = 365,
    key_type: str = "ed25519",
    now: datetime | None = None,
    bridge: bool = False,
) -> NodeCert:
    """A new key and a leaf for ``cluster/node`` signed by ``ca``, valid for ``days``.

    The leaf never outlives the CA: peers would refuse it after the CA expires.
    ``bridge`` grants the bridge role (BRIDGE_ROLE_URI).
    """
    uri = spiffe_id(ca.trust_domain, cluster, node)
    _check_days(days)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    if bridge:
        sans.append(x509.UniformResourceIdentifier(BRIDGE_ROLE_URI))
    sans += [x509.IPAddress(_ip(ip)) for ip in ips]
    sans += [x509.DNSName(_dns(name)) for name in dns]
    start = _utc(now).replace(microsecond=0)
    ca_end = ca.cert.not_valid_after_utc
    if start >= ca_end:
        raise IdentityError(f"the CA expired at {ca_end:%Y-%m-%d %H:%M} UTC")
    key = _generate_key(key_type)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_common_name(node))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(min(start + timedelta(days=days), ca_end))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # Both: every gossip connection is mutual TLS, and a node is client and server.
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, _cert_hash(ca.key))
    )
    return NodeCert(
        cert=cert,
        key=key,
        ca_cert=ca.cert,
        trust_domain=ca.trust_domain,
        cluster=cluster,
        node=node,
    )


def write_node_cert(nc: NodeCert, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``<node>.pem`` (leaf, then CA cert) and ``<node>.key`` (0600); returns both paths.

    Existing files are replaced: reissuing a node's certificate is routine.
    """
    out = Path(out_dir)
    cert_path, key_path = out / f"{nc.node}.pem", out / f"{nc.node}.key"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IdentityError(f"cannot create directory {out}: {exc.strerror or exc}") from None
    # The chain lets a TLS peer that trusts only the CA build the path itself.
    _write_atomic(cert_path, _cert_pem(nc.cert) + _cert_pem(nc.ca_cert), 0o644)
    _write_atomic(key_path, _key_pem(nc.key), 0o600)
    return cert_path, key_path


def load_node_cert(
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    ca_file: str | os.PathLike[str],
    now: datetime | None = None,
) -> NodeCert:
    """Read a node's chain, key and CA certificate(s) and check they belong together.

    ``ca_file`` may hold several CA certificates (a CA rotation); the leaf must
    be signed by one of them.  The validity period is checked only when ``now``
    is given, like everywhere in meshd, so callers choose the clock.
    """
    cert_path, key_path, ca_path = Path(cert_file), Path(key_file), Path(ca_file)
    leaf = _load_certs(cert_path, "certificate")[0]
    key = _load_key(key_path, "key")
    cas = _load_certs(ca_path, "CA certificate")
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise IdentityError(f"key {key_path} does not match certificate {cert_path}")
    issuer = _find_issuer(leaf, cas)
    if issuer is None:
        raise IdentityError(f"certificate {cert_path} is not signed by the CA in {ca_path}")
    try:
        trust_domain, cluster, node = _leaf_identity(leaf)
    except IdentityError as exc:
        raise IdentityError(f"certificate {cert_path}: {exc}") from None
    ca_domain = _ca_trust_domain(issuer)
    if ca_domain is not None and ca_domain != trust_domain:
        raise IdentityError(
            f"certificate {cert_path} names trust domain {trust_domain!r}"
            f" but its CA in {ca_path} is for {ca_domain!r}"
        )
    if now is not None:
        _check_window(leaf, _utc(now), f"certificate {cert_path}")
        _check_window(issuer, _utc(now), f"CA certificate {ca_path}")
    return NodeCert(
        cert=leaf,
        key=key,
        ca_cert=issuer,
        trust_domain=trust_domain,
        cluster=cluster,
        node=node,
    )


# ---------------------------------------------------------------------------
# Verifying a peer's certificate.


@dataclass(frozen=True, slots=True)
class _CertInfo:
    """What a CA-signed certificate says, checked once and remembered per DER bytes.

    ``problem`` is a "bad-cert" rejection for a cert our CA signed that still
    names no usable identity; it is reported after the clock check, as the
    verifier's order of checks requires.
    """

    not_before: datetime
    not_after: datetime
    problem: Rejection | None
    cluster: str = ""
    node: str = ""
    public_key: PublicKey | None = None
    bridge: bool = False
    serial: int = 0


def _examine(
    der: bytes, cas: Sequence[x509.Certificate], trust_domain: str
) -> _CertInfo | Rejection:
    """Parse and chain-check one cert.  Never raises: DER comes from peers."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except Exception as exc:
        return Rejection("bad-cert", f"unparseable: {type(exc).__name__}")
    issuer = _find_issuer(cert, cas)
    if issuer is None:
        return Rejection("untrusted-cert", "not signed by a trusted CA")
    try:
        # A leaf is good only while the CA that vouches for it is.
        not_before = max(cert.not_valid_before_utc, issuer.not_valid_before_utc)
        not_after = min(cert.not_valid_after_utc, issuer.not_valid_after_utc)
    except Exception as exc:
        return Rejection("bad-cert", f"validity: {type(exc).__name__}")
    try:
        domain, cluster, node = _leaf_identity(cert)
        if domain != trust_domain:
            return _CertInfo(not_before, not_after, Rejection("bad-cert", f"trust domain {domain}"))
        public_key = _usable_public_key(cert.public_key())
        if public_key is None:
            return _CertInfo(not_before, not_after, Rejection("bad-cert", "unsupported key type"))
    except IdentityError as exc:
        return _CertInfo(not_before, not_after, Rejection("bad-cert", str(exc)[:120]))
    except Exception as exc:
        return _CertInfo(not_before, not_after, Rejection("bad-cert", type(exc).__name__))
    bridge = BRIDGE_ROLE_URI in _uri_sans(cert)
    return _CertInfo(
        not_before, not_after, None, cluster, node, public_key, bridge, cert.serial_number
    )


def _window_rejection(info: _CertInfo, now: datetime) -> Rejection | None:
    now = _utc(now)
    if now < info.not_before:
        return Rejection("expired-cert", f"not valid before {info.not_before:%Y-%m-%dT%H:%M:%SZ}")
    if now > info.not_after:
        return Rejection("expired-cert", f"expired at {info.not_after:%Y-%m-%dT%H:%M:%SZ}")
    return None


def verify_peer_certificate(
    der: bytes,
    ca_certs: Sequence[x509.Certificate] | x509.Certificate,
    trust_domain: str,
    now: datetime | None = None,
    revoked: Callable[[int], bool] | None = None,
) -> tuple[str, str]:
    """(cluster, node) named by a peer's leaf certificate; IdentityError if it is not ours.

    For the TLS layer after the handshake.  The validity period is checked only
    when ``now`` is given (the TLS library has checked it already); ``revoked``
    says whether a serial number is on the CA's revocation list.
    """
    looked = _examine(der, _ca_list(ca_certs), _check_trust_domain(trust_domain))
    if isinstance(looked, Rejection):
        raise IdentityError(f"peer certificate rejected ({looked.reason}): {looked.detail}")
    if revoked is not None and revoked(looked.serial):
        raise IdentityError(f"peer certificate rejected (revoked-cert): serial {looked.serial:x}")
    if now is not None:
        expired = _window_rejection(looked, now)
        if expired is not None:
            raise IdentityError(f"peer certificate rejected ({expired.reason}): {expired.detail}")
    if looked.problem is not None:
        raise IdentityError(f"peer certificate rejected (bad-cert): {looked.problem.detail}")
    return looked.cluster, looked.node


# ---------------------------------------------------------------------------
# Signing and verifying origin states.


class StateSigner:
    """Signs this node's own origin states with its certificate key."""

    def __init__(self, node_cert: NodeCert) -> None:
        self.node_cert = node_cert
        self._cert_der = node_cert.cert_der

    def sign_claim(self, claim: MemberClaim) -> SignedClaim:
        """Sign what this node says about itself (alive or left at an incarnation)."""
        if claim.member != self.node_cert.member_id:
            raise IdentityError(
                f"the certificate of {self.node_cert.member_id} cannot sign for {claim.member}"
            )
        body = claim.encode()
        return SignedClaim(
            body=body, signature=_sign(self.node_cert.key, body), cert=self._cert_der
        )

    def sign(self, state: OriginState) -> SignedState:
        nc = self.node_cert
        # Verifiers would reject it anyway; refusing here finds the bug at its source.
        if state.cluster != nc.cluster or state.node != nc.node:
            raise IdentityError(f"the certificate of {nc.member_id} cannot sign {state.origin}")
        body = state.encode()
        return SignedState(
            origin=state.origin,
            version=state.version,
            body=body,
            signature=_sign(nc.key, body),
            cert=self._cert_der,
        )


_ResultKey = tuple[bytes, bytes, bytes]
_Outcome = OriginState | MemberClaim | Rejection


def _decoded(decode: Callable[[bytes], _T], body: bytes) -> _T | Rejection:
    """A signed body decoded, or why it is malformed (never raises: the signer
    may have signed anything)."""
    try:
        return decode(body)
    except wire.WireError as exc:
        return Rejection("malformed", str(exc)[:120])
    except Exception as exc:
        return Rejection("malformed", type(exc).__name__)


def _is_statement(state: OriginState) -> bool:
    """Does this document state something about others (a bridge's role)?"""
    return (
        state.bridge
        or bool(state.down)
        or bool(state.unreachable)
        or bool(state.rtt)
        or bool(state.left)
    )


class StateVerifier:
    """Checks signed origin states and member claims against the CA certificates
    of one trust domain.

    Two bounded LRU caches make repeats cheap, because the same immutable
    signed value is verified again and again (every relay, every simulated
    node sharing this verifier):

    * per certificate DER: the chain check and the identity the cert names;
    * per (body, signature, cert): the outcome once the signature has been
      checked.  The key's bytes hash once and compare by identity when the
      same objects come back, so a hit costs a dict lookup.

    Only what a CA-signed certificate or its key vouched for is remembered:
    unparseable or untrusted certs and bad signatures are recomputed each time.
    Anyone can fabricate those, so caching them would let an anonymous peer
    fill the caches with junk and evict the entries that matter.  The clock
    check, the revocation check and the origin/version check depend on the
    call, not the key, and are redone on every hit.

    ``clock`` (wall-clock UTC) makes every verification check the signer's
    validity period at that moment; without it (a simulator on virtual time)
    the period is checked only when a call passes ``now``.  ``revoked`` says
    whether a certificate serial is on the CA's revocation list.

    ``hits`` and ``misses`` count lookups in the outcome cache.
    """

    def __init__(
        self,
        ca_certs: Sequence[x509.Certificate] | x509.Certificate,
        trust_domain: str,
        cache_size: int = 65536,
        clock: Callable[[], datetime] | None = None,
        revoked: Callable[[int], bool] | None = None,
    ) -> None:
        if not isinstance(cache_size, int) or cache_size < 0:
            raise IdentityError("cache_size must be a non-negative integer")
        self._cas = _ca_list(ca_certs)
        self.trust_domain = _check_trust_domain(trust_domain)
        self.cache_size = cache_size
        self.clock = clock
        self.revoked = revoked
        self._certs: OrderedDict[bytes, _CertInfo] = OrderedDict()
        self._results: OrderedDict[_ResultKey, tuple[_CertInfo, _Outcome]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def verify(self, signed: SignedState, now: datetime | None = None) -> OriginState | Rejection:
        """The state ``signed`` carries, or why it is refused.  Never raises on peer input."""
        outcome = self._outcome(signed.body, signed.signature, signed.cert, now, self._open)
        if isinstance(outcome, Rejection):
            return outcome
        if not isinstance(outcome, OriginState):
            return Rejection("malformed", "not an origin state")
        # The outside copies are unsigned; a relay must not be able to make a
        # state look newer (or like another origin's) in digests.
        if signed.origin != outcome.origin or signed.version != outcome.version:
            return Rejection(
                "origin-mismatch",
                f"carried {signed.origin:.120}@{signed.version}, "
                f"signed {outcome.origin}@{outcome.version}",
            )
        return outcome

    def verify_claim(
        self, signed: SignedClaim, now: datetime | None = None
    ) -> MemberClaim | Rejection:
        """The member claim ``signed`` carries, or why it is refused.  Never raises on input."""
        outcome = self._outcome(signed.body, signed.signature, signed.cert, now, self._open_claim)
        if isinstance(outcome, MemberClaim | Rejection):
            return outcome
        return Rejection("malformed", "not a member claim")

    def serial_of(self, cert: bytes) -> int | None:
        """The serial number of a CA-signed certificate (cached), None for any other."""
        info = self._cert_info(cert)
        return None if isinstance(info, Rejection) else info.serial

    def current(self, cert: bytes, now: datetime | None = None) -> Rejection | None:
        """Why a certificate that signed something we hold no longer vouches for it
        (expired, revoked), or None while it does."""
        info = self._cert_info(cert)
        if isinstance(info, Rejection):
            return info
        return self._still_good(info, now)

    def _still_good(self, info: _CertInfo, now: datetime | None) -> Rejection | None:
        if now is None and self.clock is not None:
            now = self.clock()
        if now is not None:
            expired = _window_rejection(info, now)
            if expired is not None:
                return expired
        if self.revoked is not None and self.revoked(info.serial):
            return Rejection("revoked-cert", f"serial {info.serial:x}")
        return None

    def _outcome(
        self,
        body: bytes,
        signature: bytes,
        cert: bytes,
        now: datetime | None,
        opener: Callable[[_CertInfo, bytes, bytes], tuple[_Outcome, bool]],
    ) -> _Outcome:
        key = (body, signature, cert)
        cached = self._results.get(key)
        outcome: _Outcome | None
        if cached is not None:
            self._results.move_to_end(key)
            self.hits += 1
            info, outcome = cached
        else:
            self.misses += 1
            looked = self._cert_info(cert)
            if isinstance(looked, Rejection):
                return looked
            info, outcome = looked, None
        bad = self._still_good(info, now)
        if bad is not None:
            return bad
        if outcome is None:
            outcome, vouched = opener(info, body, signature)
            if vouched:
                self._remember(self._results, key, (info, outcome))
        return outcome

    def _cert_info(self, der: bytes) -> _CertInfo | Rejection:
        info = self._certs.get(der)
        if info is not None:
            self._certs.move_to_end(der)
            return info
        looked = _examine(der, self._cas, self.trust_domain)
        if isinstance(looked, _CertInfo):
            self._remember(self._certs, der, looked)
        return looked

    @staticmethod
    def _signed_by(info: _CertInfo, body: bytes, signature: bytes) -> Rejection | None:
        if info.problem is not None or info.public_key is None:
            return info.problem or Rejection("bad-cert", "no key")
        try:
            if not _signature_ok(info.public_key, signature, body):
                return Rejection("bad-signature", f"by {info.cluster}/{info.node}")
        except Exception as exc:  # e.g. a signature that is not even DER for ECDSA
            return Rejection("bad-signature", type(exc).__name__)
        return None

    @classmethod
    def _open(cls, info: _CertInfo, body: bytes, signature: bytes) -> tuple[_Outcome, bool]:
        """The outcome after the clock check, and whether the cert's key vouched for it."""
        bad = cls._signed_by(info, body, signature)
        if bad is not None:
            return bad, False
        # From here on the key signed these exact bytes, so the outcome is the
        # signer's doing and safe to remember.
        state = _decoded(OriginState.decode, body)
        if isinstance(state, Rejection):
            return state, True
        if state.cluster != info.cluster:
            return Rejection(
                "cluster-mismatch", f"cert {info.cluster}, state {state.cluster}"
            ), True
        if state.node != info.node:
            return Rejection("node-mismatch", f"cert {info.node}, state {state.node}"), True
        if _is_statement(state) and not info.bridge:
            # Down, unreachable and round-trip statements speak for others:
            # only a node the CA made a bridge may make them.
            return Rejection("not-bridge", f"{info.cluster}/{info.node} holds no bridge role"), True
        return state, True

    @classmethod
    def _open_claim(cls, info: _CertInfo, body: bytes, signature: bytes) -> tuple[_Outcome, bool]:
        bad = cls._signed_by(info, body, signature)
        if bad is not None:
            return bad, False
        claim = _decoded(MemberClaim.decode, body)
        if isinstance(claim, Rejection):
            return claim, True
        if claim.member != wire.member_id(info.cluster, info.node):
            return Rejection(
                "node-mismatch", f"cert {info.cluster}/{info.node}, claim {claim.member}"
            ), True
        return claim, True

    def _remember(self, cache: OrderedDict[_K, _V], key: _K, value: _V) -> None:
        if self.cache_size == 0:
            return
        cache[key] = value
        if len(cache) > self.cache_size:
            cache.popitem(last=False)
