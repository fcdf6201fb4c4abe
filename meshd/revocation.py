"""Revocation: the mesh CA's signed list of certificate serials no agent may trust.

Theory of operation
-------------------
The list is a standard X.509 CRL, signed by the mesh CA's key, so any X.509
tool can read it and nothing but the CA can make one.  Its CRLNumber
extension is required and only grows: a list replaces the one an agent holds
only when its number is higher (:func:`compare`).  Two lists are never
merged; instead every list carries all earlier revocations
(:func:`create_revocation_list` builds the union with the previous list), and
an agent refuses a higher-numbered list that drops a serial of the one it
holds.  Revocation is permanent: to let a node back in, issue it a new
certificate.

meshd does not expire a list at its nextUpdate time.  A newer number replaces
an older list, and nothing else does.  An agent cut off from the operator
(a partition, an unattended site) must not start trusting revoked
certificates again merely because time passed; that is exactly when a
stolen key is most useful.  nextUpdate is therefore set far ahead (ten years,
capped at the CA's expiry) only because X.509 tools expect one.

Bytes from peers and API clients go through :func:`verify_revocation_list`,
which never raises: it answers a :class:`~meshd.wire.Rejection` for anything
that is not a CA-signed, numbered, bounded list.  Only our own files (the
operator's ``--previous`` list) raise :class:`RevocationError`.

Serials are compared without their issuer.  Every CA in the bundle may sign a
list (a CA rotation), and the serials meshd issues are 159 random bits, so
two CAs do not hand out the same one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from meshd.files import write_atomic
from meshd.identity import CA, IdentityError
from meshd.wire import Rejection

log = logging.getLogger("meshd.revocation")

#: Largest list in bytes (DER).  A list travels in gossip as one binary field,
#: so it must fit one (wire.MAX_BIN_BYTES); verifying it must stay cheap,
#: since any peer may send one.  About 6,700 revocations of meshd-issued
#: certificates fit.
MAX_CRL_BYTES = 256 * 1024
#: Most entries in one list.  The byte cap alone would allow ~12,000 entries
#: with short serials; this bounds the serial set every agent keeps in memory.
MAX_REVOKED_SERIALS = 10_000
#: Largest CRL number.  It is carried as a gossip integer (msgpack int64) and
#: compared as a version, so it must fit one.
MAX_CRL_NUMBER = 2**63 - 1
#: How far ahead nextUpdate is set (capped at the CA's expiry).  meshd never
#: acts on it; see the module docstring.
NEXT_UPDATE_AFTER = timedelta(days=3650)
#: The file in an agent's state directory that keeps the list across restarts.
REVOCATIONS_FILE = "revocations.crl"
#: The RFC 5280 serial number range: positive, at most 20 octets.  cryptography
#: refuses serials of 160 bits or more when building.
_MAX_SERIAL = 2**159 - 1
_PEM_MARK = b"-----BEGIN X509 CRL-----"
#: Largest input before decoding: PEM (base64 in 64-character lines) of the
#: largest DER, with room for text around it.
_MAX_INPUT_BYTES = MAX_CRL_BYTES * 3 // 2

Verdict = Literal["newer", "same", "older", "conflict", "shrinks"]


class RevocationError(IdentityError):
    """A revocation list of our own (a file, a request to build one) that cannot be used."""


class StaleRevocationList(ValueError):
    """A list that may not replace the one held; nothing changed.

    ``verdict`` is what :func:`compare` said ("older", "conflict", "shrinks"),
    short enough to serve as a metric label.
    """

    def __init__(self, message: str, verdict: Verdict) -> None:
        super().__init__(message)
        self.verdict = verdict


@dataclass(frozen=True, slots=True)
class RevocationList:
    """A verified revocation list: the CA-signed DER and what it says.

    Only :func:`verify_revocation_list` and :func:`create_revocation_list`
    make one, so holding a RevocationList means the CA signed ``der``.
    """

    der: bytes = field(repr=False)
    #: SHA-256 of the signed part (tbsCertList).  Two encodings of one list
    #: share it: an ECDSA signature can be re-encoded by anyone (s or n-s)
    #: without the CA, so "the same list" must not mean "the same bytes".
    content_id: bytes = field(repr=False)
    #: The CRLNumber: higher replaces lower, 1 for the first list.
    number: int
    serials: frozenset[int] = field(repr=False)
    this_update: datetime
    #: Informational only: meshd does not expire lists (module docstring).
    next_update: datetime | None

    def __post_init__(self) -> None:
        if not 1 <= self.number <= MAX_CRL_NUMBER:
            raise RevocationError(f"a CRL number is 1 to {MAX_CRL_NUMBER}, not {self.number}")
        if len(self.serials) > MAX_REVOKED_SERIALS:
            raise RevocationError(
                f"a revocation list holds at most {MAX_REVOKED_SERIALS} serials,"
                f" not {len(self.serials)}"
            )

    def is_revoked(self, serial: int) -> bool:
        """The ``revoked`` callable of identity's verifiers."""
        return serial in self.serials

    def pem(self) -> bytes:
        return x509.load_der_x509_crl(self.der).public_bytes(serialization.Encoding.PEM)

    def hex_serials(self) -> list[str]:
        """The serials in lowercase hex, in numeric order (how meshd prints serials)."""
        return [f"{s:x}" for s in sorted(self.serials)]

    def to_json(self) -> dict[str, object]:
        """``GET /v1/revocations``: ``{"number": N, "revoked": ["hex serial", ...]}``."""
        return {"number": self.number, "revoked": self.hex_serials()}


# ---------------------------------------------------------------------------
# Making a list (the operator's side).


def parse_serial(text: str) -> int:
    """A serial as people copy it: hex, optionally ``0x``-prefixed or colon-separated
    (openssl prints ``7A:3B:...``).  Raises RevocationError."""
    digits = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        serial = int(digits, 16) if digits.isascii() and digits.isalnum() else 0
    except ValueError:
        serial = 0
    if not 1 <= serial <= _MAX_SERIAL:
        raise RevocationError(
            f"a serial is a positive hex number of at most 40 digits, not {text!r:.60}"
        )
    return serial


def _signing_hash(ca: CA) -> hashes.SHA256 | None:
    # Ed25519 hashes internally; cryptography insists on None for it.
    return None if isinstance(ca.key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def create_revocation_list(
    ca: CA,
    serials: Iterable[int],
    previous: RevocationList | None = None,
    now: datetime | None = None,
) -> RevocationList:
    """A list revoking ``serials`` and every serial of ``previous``, numbered one past it.

    Entries already in ``previous`` keep their revocation date.  Raises
    RevocationError when the CA has expired, a serial is out of range, or the
    list would exceed the caps every agent enforces (it would be refused).
    """
    start = (now or datetime.now(UTC)).replace(microsecond=0)
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    ca_end = ca.cert.not_valid_after_utc
    if start >= ca_end:
        raise RevocationError(f"the CA expired at {ca_end:%Y-%m-%d %H:%M} UTC")
    number = 1 if previous is None else previous.number + 1
    if number > MAX_CRL_NUMBER:
        raise RevocationError(f"the previous list's number {number - 1} is the largest there is")
    dates: dict[int, datetime] = {}
    if previous is not None:
        for entry in x509.load_der_x509_crl(previous.der):
            dates[entry.serial_number] = entry.revocation_date_utc
        dates.update((s, start) for s in previous.serials if s not in dates)
    for serial in serials:
        if not isinstance(serial, int) or isinstance(serial, bool):
            raise RevocationError(f"a serial is an integer, not {serial!r:.40}")
        if not 1 <= serial <= _MAX_SERIAL:
            raise RevocationError(f"serial {serial:x} is outside 1 to 2^159-1")
        dates.setdefault(serial, start)
    if len(dates) > MAX_REVOKED_SERIALS:
        raise RevocationError(
            f"the list would hold {len(dates)} serials, more than the {MAX_REVOKED_SERIALS}"
            " every agent accepts; move the mesh to a new CA instead"
        )
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(start)
        .next_update(min(start + NEXT_UPDATE_AFTER, ca_end))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    for serial in sorted(dates):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(dates[serial])
            .build()
        )
    crl = builder.sign(ca.key, _signing_hash(ca))
    der = crl.public_bytes(serialization.Encoding.DER)
    if len(der) > MAX_CRL_BYTES:
        raise RevocationError(
            f"the list would take {len(der)} bytes, more than the {MAX_CRL_BYTES}"
            " every agent accepts; move the mesh to a new CA instead"
        )
    return RevocationList(
        der=der,
        content_id=_content_id(crl),
        number=number,
        serials=frozenset(dates),
        this_update=start,
        next_update=min(start + NEXT_UPDATE_AFTER, ca_end),
    )


# ---------------------------------------------------------------------------
# Verifying a list (bytes from peers, API clients and files).


def _content_id(crl: x509.CertificateRevocationList) -> bytes:
    return hashlib.sha256(crl.tbs_certlist_bytes).digest()


def _vouches(ca: x509.Certificate, crl: x509.CertificateRevocationList) -> bool:
    # Any exception means "not this CA": cryptography parses some fields (the
    # issuer name among them) only when read, so junk can raise anything here.
    try:
        if crl.issuer != ca.subject:
            return False
        try:
            usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        # A CA whose key usage forbids signing CRLs vouches for none (RFC 5280 4.2.1.3).
        if usage is not None and not usage.crl_sign:
            return False
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except Exception:
        return False


def _outside(ca: x509.Certificate, now: datetime | None) -> bool:
    if now is None:
        return False
    at = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
    return not ca.not_valid_before_utc <= at <= ca.not_valid_after_utc


def verify_revocation_list(
    data: bytes,
    ca_certs: Sequence[x509.Certificate] | x509.Certificate,
    now: datetime | None = None,
) -> RevocationList | Rejection:
    """The list ``data`` holds (DER, or PEM as an API client may send it), or why not.

    Never raises: ``data`` comes from peers and clients.  The signature is
    checked before anything in the list is read.  When ``now`` is given, the
    signing CA must be valid at that moment.
    """
    cas = [ca_certs] if isinstance(ca_certs, x509.Certificate) else list(ca_certs)
    if not isinstance(data, bytes | bytearray):
        return Rejection("bad-crl", "a revocation list is bytes")
    if len(data) > _MAX_INPUT_BYTES:
        return Rejection("bad-crl", f"{len(data)} bytes, more than the limit of {MAX_CRL_BYTES}")
    try:
        if data.lstrip().startswith(_PEM_MARK):
            crl = x509.load_pem_x509_crl(bytes(data))
        else:
            crl = x509.load_der_x509_crl(bytes(data))
        der = crl.public_bytes(serialization.Encoding.DER)
    except Exception:
        return Rejection("bad-crl", "it is not an X.509 revocation list (CRL) in DER or PEM")
    if len(der) > MAX_CRL_BYTES:
        return Rejection("bad-crl", f"{len(der)} bytes, more than the limit of {MAX_CRL_BYTES}")
    signer = next((ca for ca in cas if _vouches(ca, crl)), None)
    if signer is None:
        return Rejection("untrusted-crl", "it is not signed by a CA this mesh trusts")
    if _outside(signer, now):
        return Rejection("untrusted-crl", "the CA that signed it is not valid now")
    if not der.endswith(b"\x00" + crl.signature):
        # The signature BIT STRING may also be encoded with unused bits; such
        # a copy verifies but is other bytes.  Only the usual form is
        # spread, so every agent holds and passes on the same bytes.
        return Rejection("bad-crl", "its signature is not encoded the usual way")
    # From here the CA signed every byte; what remains are our own rules.
    try:
        return _read_signed(crl, der)
    except Exception as exc:  # a signed but odd encoding cryptography parses lazily
        return Rejection("bad-crl", f"unreadable content ({type(exc).__name__})")


def _read_signed(crl: x509.CertificateRevocationList, der: bytes) -> RevocationList | Rejection:
    number: int | None = None
    for ext in crl.extensions:
        if isinstance(ext.value, x509.DeltaCRLIndicator):
            # A delta lists only changes; taking it as the whole list would
            # un-revoke everything it leaves out.
            return Rejection("bad-crl", "it is a delta CRL; meshd needs a complete list")
        if isinstance(ext.value, x509.CRLNumber):
            number = ext.value.crl_number
        elif ext.critical:
            oid = ext.oid.dotted_string
            return Rejection("bad-crl", f"it has a critical extension meshd does not know ({oid})")
    if number is None:
        return Rejection("bad-crl", "it has no CRL number, so it cannot be ordered")
    if not 1 <= number <= MAX_CRL_NUMBER:
        return Rejection("bad-crl", f"its CRL number is outside 1 to {MAX_CRL_NUMBER}")
    serials: set[int] = set()
    for count, entry in enumerate(crl, start=1):
        if count > MAX_REVOKED_SERIALS:
            return Rejection("bad-crl", f"more than {MAX_REVOKED_SERIALS} revoked serials")
        if any(ext.critical for ext in entry.extensions):
            # e.g. a certificate issuer (an indirect CRL): the serial would
            # belong to someone else's CA.
            return Rejection("bad-crl", "an entry has a critical extension meshd does not know")
        serials.add(entry.serial_number)
    return RevocationList(
        der=der,
        content_id=_content_id(crl),
        number=number,
        serials=frozenset(serials),
        this_update=crl.last_update_utc,
        next_update=crl.next_update_utc,
    )


def load_revocation_list(
    path: str | os.PathLike[str],
    ca_certs: Sequence[x509.Certificate] | x509.Certificate,
    now: datetime | None = None,
) -> RevocationList:
    """Read and verify a list file of our own (PEM or DER); RevocationError says why not."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(_MAX_INPUT_BYTES + 1)  # one past the limit, to say "too large"
    except FileNotFoundError:
        raise RevocationError(f"revocation list {p} does not exist") from None
    except OSError as exc:
        raise RevocationError(f"cannot read revocation list {p}: {exc.strerror or exc}") from None
    got = verify_revocation_list(data, ca_certs, now)
    if isinstance(got, Rejection):
        raise RevocationError(f"revocation list {p} is refused: {got.detail}")
    return got


# ---------------------------------------------------------------------------
# Which list wins.


def compare(held: RevocationList | None, incoming: RevocationList) -> Verdict:
    """What ``incoming`` is relative to the list ``held``.

    ``newer``: a higher number that keeps every held serial; it replaces held.
    ``same``: the very list held (the same signed content, however encoded).
    ``older``: a lower number.  ``conflict``: the same number with other
    content (two lists signed from one predecessor, an operator's mistake);
    the held one stays, so agents never flap between them.  ``shrinks``: a
    higher number that drops a held serial; revocation is permanent, so it
    is refused.
    """
    if held is None:
        return "newer"
    if incoming.number < held.number:
        return "older"
    if incoming.number == held.number:
        return "same" if incoming.content_id == held.content_id else "conflict"
    if not held.serials <= incoming.serials:
        return "shrinks"
    return "newer"


def accept(held: RevocationList | None, incoming: RevocationList) -> bool:
    """True when ``incoming`` replaces ``held``; False when it is the list held.

    Raises StaleRevocationList (one sentence, and the verdict for a metric)
    when it may not replace it.
    """
    verdict = compare(held, incoming)
    if verdict == "newer":
        return True
    if verdict == "same":
        return False
    assert held is not None  # compare answers "newer" when nothing is held
    if verdict == "older":
        message = (
            f"revocation list number {incoming.number} is older than number {held.number}"
            " held by this agent; nothing changed"
        )
    elif verdict == "conflict":
        message = (
            f"revocation list number {incoming.number} differs from the list of the same"
            " number held by this agent; make a new list with `meshd ca revoke --previous`"
            " naming every serial of both"
        )
    else:
        dropped = len(held.serials - incoming.serials)
        message = (
            f"revocation list number {incoming.number} drops {dropped} of the serials revoked by"
            f" number {held.number}; revocation is permanent, make the list with"
            " `meshd ca revoke --previous`"
        )
    raise StaleRevocationList(message, verdict)


# ---------------------------------------------------------------------------
# Keeping a list in the state directory.


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    try:
        write_atomic(path, data, mode)
    except OSError as exc:
        raise RevocationError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_revocation_list(path: str | os.PathLike[str], rl: RevocationList) -> Path:
    """Write ``rl`` as PEM (mode 0644: a list is public) to ``path``, atomically."""
    out = Path(path)
    _write_atomic(out, rl.pem(), 0o644)
    return out


def save_revocation_list(state_dir: str | os.PathLike[str], rl: RevocationList) -> Path:
    """Keep ``rl`` (DER, mode 0600) in ``state_dir/revocations.crl``, atomically.

    RevocationError names the cause when it cannot be written (a full disk, say).
    """
    path = Path(state_dir) / REVOCATIONS_FILE
    _write_atomic(path, rl.der, 0o600)
    return path


def load_saved_revocation_list(
    state_dir: str | os.PathLike[str],
    ca_certs: Sequence[x509.Certificate] | x509.Certificate,
) -> RevocationList | None:
    """The list kept in ``state_dir``, or None when there is none or it cannot be used.

    A damaged file never stops the agent: it logs one line and starts without
    the list, which comes back from the first peer that holds it.
    """
    path = Path(state_dir) / REVOCATIONS_FILE
    if not path.exists():
        return None
    try:
        return load_revocation_list(path, ca_certs)
    except RevocationError as exc:
        log.error(
            "%s; starting without a revocation list until a peer or `meshd revocation put`"
            " supplies one",
            exc,
        )
        return None
