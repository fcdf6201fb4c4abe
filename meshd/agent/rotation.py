"""Certificate rotation: take a renewed certificate without a restart, or keep the old one.

An agent re-reads its certificate and key on SIGHUP and whenever the files
change (polled every :data:`CERT_POLL_INTERVAL` seconds).  It takes only a
certificate that is still the same node: same trust domain, cluster and
node, signed by the CA the agent started with, valid now, not revoked, and
keeping the bridge role if the current one has it (:func:`load_rotated_cert`).
Anything else is one log line and the old certificate stays in use, so a
wrong file can never turn an agent into another identity, or quietly end a
bridge's role, or cut it off with an expired certificate.

A rotation is all or nothing: the new TLS contexts are built and the agent
takes the new certificate (``agent.rotate``: its documents are signed with
the new key from then on) before the transports' contexts are swapped, so
every new handshake presents the new certificate.  Connections already open
keep the old one until they close.

The watcher compares the files' contents from one poll to the next.  Files
are often replaced in two steps (certificate, then key), or written in
place.  A watcher that sees a change may therefore find a key that does not
match, or half a PEM file.  It says nothing then and tries again at the next
poll; only files that stood still for a whole interval and are still wrong
are reported, once.  The bytes are read before and after the TLS contexts
are built, so the contexts hold exactly the files that were checked.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from meshd.agent.transport import make_client_context, make_server_context
from meshd.identity import IdentityError, NodeCert, load_node_cert

log = logging.getLogger("meshd.agent")

#: Seconds between looks at the certificate and key files: a renewed
#: certificate is taken within about this (two polls for a file written in place).
CERT_POLL_INTERVAL = 1.0

_Stamp = bytes
_Snapshot = tuple[bytes, bytes, bytes] | None


class HasContexts(Protocol):
    """What rotation needs of a transport: the TLS contexts its next handshakes use."""

    server_ctx: ssl.SSLContext
    client_ctx: ssl.SSLContext


class RotatingAgent(Protocol):
    def rotate(self, node_cert: NodeCert) -> object:
        """Sign from now on with ``node_cert``; may be a coroutine.  Raises to refuse."""
        ...


def load_rotated_cert(
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    ca_file: str | os.PathLike[str],
    current: NodeCert,
    now: datetime,
    revoked: Callable[[int], bool] | None = None,
) -> NodeCert:
    """The certificate in the files, if it may replace ``current``; else IdentityError.

    It must match its key, be signed by the CA ``current`` chains to, be valid
    at ``now``, name the same trust domain, cluster and node, keep the bridge
    role if ``current`` has it, and not be revoked.  Each refusal is one
    sentence naming the file.
    """
    new = load_node_cert(cert_file, key_file, ca_file, now=now)
    if new.trust_domain != current.trust_domain:
        raise IdentityError(
            f"certificate {cert_file} is for trust domain {new.trust_domain!r},"
            f" not this agent's {current.trust_domain!r}"
        )
    if (new.cluster, new.node) != (current.cluster, current.node):
        raise IdentityError(
            f"certificate {cert_file} is for node {new.node!r} in cluster {new.cluster!r},"
            f" not this agent's node {current.node!r} in cluster {current.cluster!r}"
        )
    if new.ca_cert != current.ca_cert:
        # Peers and the verifiers trust the CA the agent started with; a
        # leaf of another CA would be refused by them.
        raise IdentityError(
            f"certificate {cert_file} is signed by another CA than the one this agent"
            " started with; changing the CA needs a restart"
        )
    if current.bridge and not new.bridge:
        raise IdentityError(
            f"certificate {cert_file} lacks the bridge role the current one grants, and a"
            " bridge may not lose it silently; issue it with `meshd cert issue --bridge`,"
            " or restart the agent without --wan-bind to run it as a plain node"
        )
    # The certificate in use is not rotated away from here (it may be revoked,
    # but then there is nothing better to take); only a different one is checked.
    if revoked is not None and new.cert != current.cert and revoked(new.serial):
        raise IdentityError(f"certificate {cert_file} (serial {new.serial:x}) is revoked")
    return new


def _contexts(ca_file: str, cert_file: str, key_file: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    return (
        make_server_context(ca_file, cert_file, key_file),
        make_client_context(ca_file, cert_file, key_file),
    )


def _utcnow() -> datetime:
    return datetime.now(UTC)


class CertificateRotator:
    """Owns the agent's current certificate and moves it, whole, to a renewed one.

    ``reload`` is the SIGHUP path (failures logged at once); ``watch`` polls
    the files.  Both run under one lock, so a signal during a poll waits.
    """

    def __init__(
        self,
        *,
        ca_file: str | os.PathLike[str],
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        current: NodeCert,
        transports: Sequence[HasContexts | None],
        agent: RotatingAgent,
        revoked: Callable[[int], bool] | None = None,
        clock: Callable[[], datetime] = _utcnow,
        make_contexts: Callable[[str, str, str], tuple[ssl.SSLContext, ssl.SSLContext]] = _contexts,
        api_contexts: Sequence[ssl.SSLContext] = (),
    ) -> None:
        self.ca_file, self.cert_file, self.key_file = Path(ca_file), Path(cert_file), Path(key_file)
        self.current = current
        self.transports = [t for t in transports if t is not None]
        self.agent = agent
        self.revoked = revoked
        self.clock = clock
        self.make_contexts = make_contexts
        #: Server contexts of the HTTPS API: a listener keeps its context, so
        #: the new chain is loaded into it (new handshakes present it).
        self.api_contexts = list(api_contexts)
        self._lock = asyncio.Lock()
        #: The files as last judged (taken or refused); the watcher acts on a change.
        self._judged = self._stamp()
        #: The files as they were when a watcher's attempt failed quietly.
        self._failed: _Stamp | None = None
        self._tasks: set[asyncio.Task[bool]] = set()

    # -- entry points --------------------------------------------------------

    async def reload(self, why: str = "SIGHUP") -> bool:
        """Try the files now; log the outcome in one line.  True when they are in use."""
        async with self._lock:
            self._judged, self._failed = self._stamp(), None
            error = await self._attempt(announce_unchanged=True)
        if error is not None:
            self._log_failure(why, error)
        return error is None

    def reload_soon(self, why: str = "SIGHUP") -> None:
        """``reload`` from a signal handler, which cannot await."""
        task = asyncio.get_running_loop().create_task(self.reload(why))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def watch(self, interval: float = CERT_POLL_INTERVAL) -> None:
        """Take changed files within about ``interval``; runs until cancelled."""
        while True:
            await asyncio.sleep(interval)
            await self.poll()

    async def poll(self) -> None:
        """One look at the files (what ``watch`` does each interval)."""
        async with self._lock:
            stamp = self._stamp()
            if stamp is None or stamp == self._judged:
                return
            error = await self._attempt(announce_unchanged=False)
            if error is None:
                self._judged, self._failed = stamp, None
            elif stamp == self._failed:
                # The same files failed a poll ago: they are what the operator
                # wrote, not a file caught half-written.  Report once.
                self._judged, self._failed = stamp, None
                self._log_failure(f"{self.cert_file} changed", error)
            else:
                self._failed = stamp

    # -- the work ------------------------------------------------------------

    async def _attempt(self, announce_unchanged: bool) -> str | None:
        """Rotate to the files' certificate if allowed; the reason in one sentence if not."""
        try:
            return await self._rotate(announce_unchanged)
        except Exception as exc:  # a bug must not end the watcher or half-rotate
            log.debug("certificate rotation failed", exc_info=True)
            return f"unexpected {type(exc).__name__}: {exc}"

    async def _rotate(self, announce_unchanged: bool) -> str | None:
        before = self._snapshot()
        try:
            new = load_rotated_cert(
                self.cert_file,
                self.key_file,
                self.ca_file,
                self.current,
                self.clock(),
                self.revoked,
            )
        except IdentityError as exc:
            return str(exc)
        if new.cert == self.current.cert:
            if announce_unchanged:
                log.info(
                    "reloaded certificates from %s: unchanged, serial %x",
                    self.cert_file,
                    new.serial,
                )
            return None
        try:
            server, client = self.make_contexts(
                str(self.ca_file), str(self.cert_file), str(self.key_file)
            )
        except (ssl.SSLError, OSError) as exc:
            return f"cannot use the TLS files: {exc}"
        if before is None or self._snapshot() != before:
            return f"{self.cert_file} or {self.key_file} changed while being read"
        try:
            taken = self.agent.rotate(new)
            if inspect.isawaitable(taken):
                await taken
        except Exception as exc:  # the agent refused it; nothing was swapped yet
            return f"the agent could not take it: {exc}"
        for t in self.transports:
            t.server_ctx, t.client_ctx = server, client
        for ctx in self.api_contexts:
            try:
                ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
            except (ssl.SSLError, OSError) as exc:  # replaced again since: the next poll
                log.error("the HTTPS API keeps its old certificate: %s", exc)
        old, self.current = self.current, new
        log.info(
            "rotated certificate: serial %x -> %x, valid until %s",
            old.serial,
            new.serial,
            f"{new.cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
        )
        return None

    def _log_failure(self, why: str, error: str) -> None:
        log.error(
            "certificate not rotated (%s): %s; still using serial %x",
            why,
            error,
            self.current.serial,
        )

    def _stamp(self) -> _Stamp | None:
        # A digest of the contents, not (mtime, size): a certificate renewed
        # for the same node often has the same size, and two writes within
        # one filesystem timestamp tick share an mtime.  Both files are a few
        # KiB, so reading them every second costs nothing.
        files = self._snapshot()
        if files is None:  # mid-replace: look again at the next poll
            return None
        return hashlib.sha256(files[0] + b"\0" + files[1]).digest()

    def _snapshot(self) -> _Snapshot:
        try:
            return (
                self.cert_file.read_bytes(),
                self.key_file.read_bytes(),
                self.ca_file.read_bytes(),
            )
        except OSError:
            return None
