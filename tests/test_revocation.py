"""Tests for meshd.revocation, the /v1/revocations routes and the `meshd revocation` verbs.

Lists are made with the real CA code; times are a fixed ``NOW`` unless a test
is about the wall clock.  The API runs over a fake agent that keeps the list
in memory with the same rule the real agent uses (``revocation.accept``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd import revocation, wire
from meshd.api.app import create_app
from meshd.api.listener import ApiListener
from meshd.cli import main
from meshd.identity import CA, create_ca, issue_node_cert
from meshd.revocation import (
    MAX_CRL_BYTES,
    REVOCATIONS_FILE,
    RevocationError,
    RevocationList,
    StaleRevocationList,
    accept,
    compare,
    create_revocation_list,
    load_revocation_list,
    load_saved_revocation_list,
    parse_serial,
    save_revocation_list,
    verify_revocation_list,
)
from meshd.wire import Rejection
from tests.api_server import api_client
from tests.fakes import FakeAgent

NOW = datetime(2025, 1, 1, tzinfo=UTC)
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@pytest.fixture(scope="module")
def ca() -> CA:
    return create_ca("mesh.local", now=NOW - timedelta(days=1))


@pytest.fixture(scope="module")
def other_ca() -> CA:
    # Same trust domain, so the same issuer name: only the key tells them apart.
    return create_ca("mesh.local", now=NOW - timedelta(days=1))


def ok(got: RevocationList | Rejection) -> RevocationList:
    assert isinstance(got, RevocationList), got
    return got


def refused(got: RevocationList | Rejection, reason: str) -> Rejection:
    assert isinstance(got, Rejection), got
    assert got.reason == reason, got
    return got


def raw_list(ca: CA, serials: Sequence[int], number: int | None = 1, **extensions: Any) -> bytes:
    """A CRL signed by ``ca`` but built by hand, to make lists meshd would never make."""
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(NOW)
        .next_update(NOW + timedelta(days=30))
    )
    if number is not None:
        b = b.add_extension(x509.CRLNumber(number), critical=False)
    for ext, critical in extensions.values():
        b = b.add_extension(ext, critical=critical)
    for s in serials:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(s).revocation_date(NOW).build()
        )
    return b.sign(ca.key, None).public_bytes(serialization.Encoding.DER)


# ---------------------------------------------------------------------------
# Making and verifying lists.


@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa-p256"])
def test_round_trip(key_type: str) -> None:
    ca = create_ca("mesh.local", now=NOW - timedelta(days=1), key_type=key_type)
    node = issue_node_cert(ca, "n1", "east", now=NOW)
    rl = create_revocation_list(ca, [node.serial, 0x1F], now=NOW)
    assert rl.number == 1
    assert rl.serials == {node.serial, 0x1F}
    assert rl.this_update == NOW
    for data in (rl.der, rl.pem()):
        back = ok(verify_revocation_list(data, [ca.cert], now=NOW))
        assert (back.der, back.number, back.serials) == (rl.der, 1, rl.serials)
        assert back.this_update == NOW
    assert rl.is_revoked(node.serial) and not rl.is_revoked(node.serial + 1)
    assert rl.to_json() == {"number": 1, "revoked": sorted(["1f", f"{node.serial:x}"], key=len)}
    # A standard CRL: what openssl and every X.509 library read.
    crl = x509.load_der_x509_crl(rl.der)
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1


def test_next_update_is_far_ahead_but_never_past_the_ca(ca: CA) -> None:
    rl = create_revocation_list(ca, [5], now=NOW)
    assert rl.next_update == ca.cert.not_valid_after_utc  # the CA ends before 10 years pass
    long_ca = create_ca("mesh.local", days=20 * 365, now=NOW)
    rl = create_revocation_list(long_ca, [5], now=NOW)
    assert rl.next_update == NOW + revocation.NEXT_UPDATE_AFTER


def test_next_update_does_not_expire_a_list(ca: CA) -> None:
    data = raw_list(ca, [5])  # nextUpdate NOW + 30 days
    rl = ok(verify_revocation_list(data, [ca.cert], now=NOW + timedelta(days=400)))
    assert rl.serials == {5}


def test_a_newer_list_keeps_every_old_serial_and_its_date(ca: CA) -> None:
    first = create_revocation_list(ca, [1, 2], now=NOW)
    later = NOW + timedelta(days=3)
    second = create_revocation_list(ca, [3, 2], previous=first, now=later)
    assert second.number == 2 and second.serials == {1, 2, 3}
    dates = {e.serial_number: e.revocation_date_utc for e in x509.load_der_x509_crl(second.der)}
    assert dates == {1: NOW, 2: NOW, 3: later}
    third = create_revocation_list(ca, [], previous=second, now=later)
    assert third.number == 3 and third.serials == second.serials
    assert compare(first, second) == compare(second, third) == "newer"


def test_a_list_signed_by_another_ca_is_refused(ca: CA, other_ca: CA) -> None:
    foreign = create_revocation_list(other_ca, [7], now=NOW)
    assert x509.load_der_x509_crl(foreign.der).issuer == ca.cert.subject  # same name
    rej = refused(verify_revocation_list(foreign.der, [ca.cert]), "untrusted-crl")
    assert "not signed by a CA this mesh trusts" in rej.detail
    # With both CAs trusted (a CA rotation) it is taken.
    assert ok(verify_revocation_list(foreign.der, [ca.cert, other_ca.cert])).serials == {7}


def test_a_ca_that_may_not_sign_lists_vouches_for_none(ca: CA) -> None:
    usage = ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.crl_sign  # ours may; a CA certificate that forbids it is not trusted for lists
    data = raw_list(ca, [1])
    b = x509.CertificateBuilder().subject_name(ca.cert.subject).issuer_name(ca.cert.subject)
    b = b.public_key(ca.key.public_key()).serial_number(1)
    b = b.not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=1))
    no_crl_sign = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    restricted = b.add_extension(no_crl_sign, critical=True).sign(ca.key, None)
    refused(verify_revocation_list(data, [restricted]), "untrusted-crl")


def test_a_tampered_list_is_refused(ca: CA) -> None:
    rl = create_revocation_list(ca, [0xABCDEF01], now=NOW)
    at = rl.der.index(bytes.fromhex("abcdef01"))
    forged = rl.der[:at] + bytes.fromhex("abcdef02") + rl.der[at + 4 :]
    refused(verify_revocation_list(forged, [ca.cert]), "untrusted-crl")


def test_no_single_byte_change_makes_another_list(ca: CA) -> None:
    rl = create_revocation_list(ca, [0x42, 0x4242], now=NOW)
    for i in range(len(rl.der)):
        for flip in (0x01, 0x80):
            data = rl.der[:i] + bytes([rl.der[i] ^ flip]) + rl.der[i + 1 :]
            got = verify_revocation_list(data, [ca.cert])
            assert isinstance(got, Rejection), (i, flip)


def tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def resigned(der: bytes, signature: bytes, unused_bits: int = 0) -> bytes:
    """``der`` with its signature BIT STRING replaced (the signed part untouched)."""
    crl = x509.load_der_x509_crl(der)
    tbs, old = crl.tbs_certlist_bytes, tlv(0x03, b"\x00" + crl.signature)
    assert der.endswith(old)
    start = der.index(tbs)
    algorithm = der[start + len(tbs) : len(der) - len(old)]
    return tlv(0x30, tbs + algorithm + tlv(0x03, bytes([unused_bits]) + signature))


def test_another_encoding_of_the_same_list_is_the_same_list() -> None:
    # Anyone can turn an ECDSA signature (r, s) into (r, n - s) without the CA.
    ecdsa = create_ca("mesh.local", now=NOW - timedelta(days=1), key_type="ecdsa-p256")
    rl = create_revocation_list(ecdsa, [5], now=NOW)
    r, s = decode_dss_signature(x509.load_der_x509_crl(rl.der).signature)
    twin = ok(
        verify_revocation_list(
            resigned(rl.der, encode_dss_signature(r, P256_ORDER - s)), ecdsa.cert
        )
    )
    assert twin.der != rl.der and twin.content_id == rl.content_id
    assert compare(rl, twin) == "same" and accept(rl, twin) is False


def test_a_signature_with_unused_bits_is_refused(ca: CA) -> None:
    # One bit shorter but the same bytes: a second encoding of the same list,
    # valid only when the bit dropped is 0, as it is in about half of them.
    for _ in range(64):
        rl = create_revocation_list(ca, [5], now=NOW + timedelta(seconds=_))
        signature = x509.load_der_x509_crl(rl.der).signature
        if signature[-1] & 1 == 0:
            break
    rej = refused(verify_revocation_list(resigned(rl.der, signature, 1), ca.cert), "bad-crl")
    assert "not encoded the usual way" in rej.detail


def test_a_list_without_a_number_is_refused(ca: CA) -> None:
    rej = refused(verify_revocation_list(raw_list(ca, [1], number=None), [ca.cert]), "bad-crl")
    assert "no CRL number" in rej.detail
    refused(verify_revocation_list(raw_list(ca, [1], number=0), [ca.cert]), "bad-crl")
    too_big = raw_list(ca, [1], number=revocation.MAX_CRL_NUMBER + 1)
    refused(verify_revocation_list(too_big, [ca.cert]), "bad-crl")


def test_a_delta_list_or_an_unknown_critical_extension_is_refused(ca: CA) -> None:
    delta = raw_list(ca, [1], d=(x509.DeltaCRLIndicator(1), True))
    assert "delta" in refused(verify_revocation_list(delta, [ca.cert]), "bad-crl").detail
    odd = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")
    data = raw_list(ca, [1], o=(odd, True))
    assert "critical" in refused(verify_revocation_list(data, [ca.cert]), "bad-crl").detail
    # The same extension, not critical, may be ignored (RFC 5280).
    ok(verify_revocation_list(raw_list(ca, [1], o=(odd, False)), [ca.cert]))


def test_an_oversized_list_is_refused(ca: CA, monkeypatch: pytest.MonkeyPatch) -> None:
    assert MAX_CRL_BYTES <= wire.MAX_BIN_BYTES  # a list always fits one gossip field
    refused(verify_revocation_list(b"\x30" * (2 * MAX_CRL_BYTES), [ca.cert]), "bad-crl")
    rl = create_revocation_list(ca, range(1, 200), now=NOW)
    monkeypatch.setattr(revocation, "MAX_CRL_BYTES", len(rl.der) - 1)
    assert "limit" in refused(verify_revocation_list(rl.der, [ca.cert]), "bad-crl").detail
    with pytest.raises(RevocationError, match="bytes"):
        create_revocation_list(ca, range(1, 200), now=NOW)


def test_too_many_entries_are_refused(ca: CA, monkeypatch: pytest.MonkeyPatch) -> None:
    data = raw_list(ca, range(1, 102))
    monkeypatch.setattr(revocation, "MAX_REVOKED_SERIALS", 100)
    rej = refused(verify_revocation_list(data, [ca.cert]), "bad-crl")
    assert "more than 100" in rej.detail
    with pytest.raises(RevocationError, match="101 serials"):
        create_revocation_list(ca, range(1, 102), now=NOW)


def test_a_list_of_an_expired_ca_is_refused_when_now_is_given(ca: CA) -> None:
    rl = create_revocation_list(ca, [1], now=NOW)
    after = ca.cert.not_valid_after_utc + timedelta(seconds=1)
    refused(verify_revocation_list(rl.der, [ca.cert], now=after), "untrusted-crl")
    ok(verify_revocation_list(rl.der, [ca.cert]))
    with pytest.raises(RevocationError, match="expired"):
        create_revocation_list(ca, [1], now=after)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", b"\x30\x03\x02"],
)
def test_junk_is_refused(ca: CA, data: bytes) -> None:
    refused(verify_revocation_list(data, [ca.cert]), "bad-crl")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_verify_never_raises(data: bytes) -> None:
    ca = _HYPOTHESIS_CA
    assert isinstance(verify_revocation_list(data, [ca.cert]), Rejection)
    valid = create_revocation_list(ca, [9], now=NOW).der
    cut = verify_revocation_list(valid[: len(data) % len(valid)], [ca.cert])
    assert isinstance(cut, Rejection)


_HYPOTHESIS_CA = create_ca("mesh.local", now=NOW - timedelta(days=1))


def test_create_refuses_bad_serials(ca: CA) -> None:
    for bad in (0, -1, 2**159):
        with pytest.raises(RevocationError):
            create_revocation_list(ca, [bad], now=NOW)
    with pytest.raises(RevocationError):
        create_revocation_list(ca, ["12"], now=NOW)  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("text", "serial"),
    [("1a", 0x1A), ("0x1A", 0x1A), ("7A:3B:00", 0x7A3B00), (" ff ", 0xFF), ("f" * 39, 16**39 - 1)],
)
def test_parse_serial(text: str, serial: int) -> None:
    assert parse_serial(text) == serial


@pytest.mark.parametrize(
    "text", ["", "0", "0x", "xyz", "-1", "1 2", "１２", "f" * 41, "8" + "0" * 39]
)
def test_parse_serial_refuses(text: str) -> None:
    with pytest.raises(RevocationError, match="positive hex number"):
        parse_serial(text)


# ---------------------------------------------------------------------------
# Which list wins.


def test_compare_and_accept(ca: CA) -> None:
    one = create_revocation_list(ca, [1], now=NOW)
    two = create_revocation_list(ca, [2], previous=one, now=NOW)
    rival_two = create_revocation_list(ca, [3], previous=one, now=NOW)
    fresh = create_revocation_list(ca, [9], now=NOW)  # number 1 again, made without --previous
    three_without_one = RevocationList(
        der=b"x",
        content_id=b"x",
        number=3,
        serials=frozenset({2}),
        this_update=NOW,
        next_update=None,
    )
    assert compare(None, one) == "newer" and accept(None, one) is True
    assert compare(one, two) == "newer" and accept(one, two) is True
    assert compare(two, two) == "same" and accept(two, two) is False
    assert compare(two, one) == "older"
    assert compare(two, rival_two) == "conflict"
    assert compare(one, fresh) == "conflict"
    assert compare(two, three_without_one) == "shrinks"
    for held, incoming, verdict, words in [
        (two, one, "older", "older than number 2"),
        (two, rival_two, "conflict", "differs from the list of the same number"),
        (two, three_without_one, "shrinks", "drops 1 of the serials revoked by number 2"),
    ]:
        with pytest.raises(StaleRevocationList, match=words) as info:
            accept(held, incoming)
        assert info.value.verdict == verdict
        assert isinstance(info.value, ValueError)


def test_a_revocation_list_checks_its_fields() -> None:
    with pytest.raises(RevocationError):
        RevocationList(
            der=b"",
            content_id=b"",
            number=0,
            serials=frozenset(),
            this_update=NOW,
            next_update=None,
        )


# ---------------------------------------------------------------------------
# Files.


def test_save_and_load(tmp_path: Path, ca: CA) -> None:
    assert load_saved_revocation_list(tmp_path, [ca.cert]) is None
    rl = create_revocation_list(ca, [4, 5], now=NOW)
    path = save_revocation_list(tmp_path, rl)
    assert path == tmp_path / REVOCATIONS_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes() == rl.der
    assert sorted(p.name for p in tmp_path.iterdir()) == [REVOCATIONS_FILE]  # no temp file left
    back = load_saved_revocation_list(tmp_path, [ca.cert])
    assert back is not None and back.der == rl.der and back.number == 1
    newer = create_revocation_list(ca, [6], previous=rl, now=NOW)
    save_revocation_list(tmp_path, newer)
    again = load_saved_revocation_list(tmp_path, [ca.cert])
    assert again is not None and again.serials == {4, 5, 6}


def test_save_failure_is_one_sentence(tmp_path: Path, ca: CA) -> None:
    rl = create_revocation_list(ca, [4], now=NOW)
    with pytest.raises(RevocationError, match="cannot write"):
        save_revocation_list(tmp_path / "missing", rl)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign", "empty"])
def test_a_damaged_saved_list_is_one_log_line_and_none(
    tmp_path: Path,
    ca: CA,
    other_ca: CA,
    damage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rl = create_revocation_list(ca, [4], now=NOW)
    path = save_revocation_list(tmp_path, rl)
    if damage == "truncate":
        path.write_bytes(rl.der[: len(rl.der) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(300))
    elif damage == "foreign":
        path.write_bytes(create_revocation_list(other_ca, [4], now=NOW).der)
    else:
        path.write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="meshd.revocation"):
        assert load_saved_revocation_list(tmp_path, [ca.cert]) is None
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert str(path) in record.getMessage() and "\n" not in record.getMessage()
    assert "starting without a revocation list" in record.getMessage()


def test_load_revocation_list_errors(tmp_path: Path, ca: CA, other_ca: CA) -> None:
    with pytest.raises(RevocationError, match="does not exist"):
        load_revocation_list(tmp_path / "nope.pem", [ca.cert])
    foreign = tmp_path / "foreign.pem"
    revocation.write_revocation_list(foreign, create_revocation_list(other_ca, [1], now=NOW))
    with pytest.raises(RevocationError, match="not signed by a CA this mesh trusts"):
        load_revocation_list(foreign, [ca.cert])
    big = tmp_path / "big.pem"
    big.write_bytes(b"\x30" * (3 * MAX_CRL_BYTES))
    with pytest.raises(RevocationError, match="limit"):
        load_revocation_list(big, [ca.cert])


def test_write_revocation_list_is_pem_and_public(tmp_path: Path, ca: CA) -> None:
    rl = create_revocation_list(ca, [1], now=NOW)
    path = revocation.write_revocation_list(tmp_path / "crl.pem", rl)
    assert path.read_bytes().startswith(b"-----BEGIN X509 CRL-----")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert load_revocation_list(path, [ca.cert]).der == rl.der


# ---------------------------------------------------------------------------
# The API against the shared fake agent (tests/fakes.py).


@pytest.fixture
def fake(ca: CA) -> FakeAgent:
    return FakeAgent([ca.cert])


@pytest.fixture
async def client(fake: FakeAgent) -> AsyncIterator[TestClient]:
    async with api_client(create_app(fake)) as c:
        yield c


async def answer(resp: Any) -> tuple[int, Any]:
    return resp.status, await resp.json()


async def test_api_put_and_get(client: TestClient, fake: FakeAgent, ca: CA) -> None:
    assert await answer(await client.get("/v1/revocations")) == (200, {"number": 0, "revoked": []})
    one = create_revocation_list(ca, [0x10, 0x2], now=NOW)
    resp = await client.put("/v1/revocations", data=one.pem())
    assert await answer(resp) == (200, {"number": 1, "revoked": 2})
    two = create_revocation_list(ca, [0x3], previous=one, now=NOW)
    resp = await client.put(
        "/v1/revocations", data=two.der, headers={"Content-Type": "application/pkix-crl"}
    )
    assert await answer(resp) == (200, {"number": 2, "revoked": 3})
    got = await answer(await client.get("/v1/revocations"))
    assert got == (200, {"number": 2, "revoked": ["2", "3", "10"]})
    # The same list again (a retried request) is fine and changes nothing.
    assert await answer(await client.put("/v1/revocations", data=two.der)) == (
        200,
        {"number": 2, "revoked": 3},
    )
    assert fake.held is not None and fake.held.der == two.der


async def test_api_stale_list_is_409_and_changes_nothing(
    client: TestClient, fake: FakeAgent, ca: CA
) -> None:
    one = create_revocation_list(ca, [1], now=NOW)
    two = create_revocation_list(ca, [2], previous=one, now=NOW)
    assert (await client.put("/v1/revocations", data=two.der)).status == 200
    status, body = await answer(await client.put("/v1/revocations", data=one.der))
    assert status == 409
    assert body == {
        "error": "revocation list number 1 is older than number 2 held by this agent;"
        " nothing changed"
    }
    rival = create_revocation_list(ca, [3], previous=one, now=NOW)
    status, body = await answer(await client.put("/v1/revocations", data=rival.der))
    assert status == 409 and "differs" in body["error"]
    assert fake.held is not None and fake.held.der == two.der
    text = fake.metrics.exposition().decode()
    assert 'meshd_rejected_total{reason="crl-older"} 1.0' in text
    assert 'meshd_rejected_total{reason="crl-conflict"} 1.0' in text


@pytest.mark.parametrize("body", ["garbage", "empty", "foreign", "unnumbered"])
async def test_api_bad_list_is_400_and_never_reaches_the_agent(
    client: TestClient, fake: FakeAgent, other_ca: CA, ca: CA, body: str
) -> None:
    data = {
        "garbage": b"not a list at all",
        "empty": b"  \n",
        "foreign": create_revocation_list(other_ca, [1], now=NOW).der,
        "unnumbered": raw_list(ca, [1], number=None),
    }[body]
    status, answer_ = await answer(await client.put("/v1/revocations", data=data))
    assert status == 400
    assert list(answer_) == ["error"] and "\n" not in answer_["error"]
    assert fake.puts == [] and fake.held is None


async def test_api_foreign_list_names_the_reason(
    client: TestClient, fake: FakeAgent, other_ca: CA
) -> None:
    data = create_revocation_list(other_ca, [1], now=NOW).der
    status, body = await answer(await client.put("/v1/revocations", data=data))
    assert (status, body) == (
        400,
        {"error": "the revocation list is refused: it is not signed by a CA this mesh trusts"},
    )
    assert 'meshd_rejected_total{reason="untrusted-crl"} 1.0' in fake.metrics.exposition().decode()


# ---------------------------------------------------------------------------
# `meshd revocation put/show` against the real API routes and the fake agent.


@pytest.fixture
async def api_url(fake: FakeAgent) -> AsyncIterator[str]:
    listener = ApiListener(create_app(fake), "127.0.0.1", 0)
    await listener.start()
    try:
        yield f"http://127.0.0.1:{listener.address[1]}"
    finally:
        await listener.close()


async def run(*argv: str) -> int:
    # main() blocks in urllib; the server needs this loop to answer.
    return await asyncio.to_thread(main, list(argv))


async def test_cli_put_and_show(
    api_url: str, fake: FakeAgent, ca: CA, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run("revocation", "show", "--api", api_url) == 0
    assert capsys.readouterr().out == "no revocation list\n"
    one = create_revocation_list(ca, [0xAB, 0x1], now=NOW)
    pem = revocation.write_revocation_list(tmp_path / "crl.pem", one)
    assert await run("revocation", "put", str(pem), "--api", api_url) == 0
    assert capsys.readouterr().out == "revocation list number 1 in force (2 revoked)\n"
    assert fake.held is not None and fake.held.der == one.der

    two = create_revocation_list(ca, [0x2], previous=one, now=NOW)
    der = tmp_path / "crl.der"
    der.write_bytes(two.der)
    assert await run("revocation", "put", str(der), "--api", api_url, "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"number": 2, "revoked": 3}

    assert await run("revocation", "show", "--api", api_url) == 0
    assert capsys.readouterr().out.splitlines() == [
        "revocation list number 2 (3 revoked)",
        "1",
        "2",
        "ab",
    ]
    assert await run("revocation", "show", "--json", "--api", api_url) == 0
    assert json.loads(capsys.readouterr().out) == {"number": 2, "revoked": ["1", "2", "ab"]}

    # A stale list: the agent's sentence, exit 1, nothing changed.
    assert await run("revocation", "put", str(pem), "--api", api_url) == 1
    err = capsys.readouterr().err
    assert err == (
        "meshd: error: revocation list number 1 is older than number 2 held by this agent;"
        " nothing changed\n"
    )
    assert fake.held.der == two.der


async def test_cli_put_refused_list_exits_1(
    api_url: str, fake: FakeAgent, other_ca: CA, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    foreign = revocation.write_revocation_list(
        tmp_path / "foreign.pem", create_revocation_list(other_ca, [1], now=NOW)
    )
    assert await run("revocation", "put", str(foreign), "--api", api_url) == 1
    assert capsys.readouterr().err == (
        "meshd: error: the revocation list is refused: it is not signed by a CA this mesh trusts\n"
    )
    assert fake.puts == []


@pytest.mark.parametrize("what", ["missing", "garbage", "huge", "certificate"])
async def test_cli_put_bad_file_exits_2_before_calling(
    api_url: str,
    fake: FakeAgent,
    ca: CA,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    what: str,
) -> None:
    path = tmp_path / "crl.pem"
    if what == "garbage":
        path.write_bytes(b"hello")
    elif what == "huge":
        path.write_bytes(b"\x30" * (3 * MAX_CRL_BYTES))
    elif what == "certificate":
        path.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    assert await run("revocation", "put", str(path), "--api", api_url) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("meshd: error: ") and str(path) in err
    assert fake.puts == []


def test_cli_revocation_unreachable_agent(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["revocation", "show", "--api", "http://127.0.0.1:1"]) == 1
    assert "cannot reach the agent" in capsys.readouterr().err
