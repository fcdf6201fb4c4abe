"""Health checks the agent runs for its own instances (contract: ``check``).

Three kinds, with Consul's semantics so Consul users meet no surprises:

``ttl``   The app reports its own status (``PUT /v1/apps/{id}/health``); each
          report re-arms a deadline of ``ttl`` seconds, and a deadline that
          passes without a report turns the instance critical.  A new TTL
          check starts critical: an app is routed to only once it has said it
          is ready.
``http``  GET the URL every ``interval``: 2xx passing, 429 warning (the app is
          up but shedding load), anything else, a connection error or a
          timeout critical.
``tcp``   Connect to HOST:PORT every ``interval``: accepted passing, anything
          else critical.

Probes time out after ``min(interval, 10 s)`` so a probe never overlaps the
next one.  The first probe runs at once, so a freshly registered instance
turns passing within one round trip rather than one interval.

What must stay true: ``on_status`` is called only when an instance's status
actually changes; nothing a probe or the callback raises escapes its task (it
is logged and counts as critical); and after :meth:`CheckRunner.stop_all`
no task, timer or socket of the runner is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from meshd.agent.interface import HEALTH, CheckSpec

if TYPE_CHECKING:
    # Imported where a probe needs it: an agent without HTTP checks never
    # loads aiohttp's client (benchmarks/idle-memory.md).
    import aiohttp

log = logging.getLogger("meshd.checks")

#: Longest a single probe may take, whatever the interval: a probe that has
#: not answered in 10 s is critical in any useful sense (Consul's default).
MAX_PROBE_TIMEOUT = 10.0
#: Sent as User-Agent so app logs can tell probes from real traffic.
USER_AGENT = "meshd health check"

StatusCallback = Callable[[str, str], None]
SessionFactory = Callable[[], "aiohttp.ClientSession"]


def probe_timeout(interval: float) -> float:
    """Seconds one HTTP or TCP probe may take: never longer than its interval."""
    return min(interval, MAX_PROBE_TIMEOUT)


def http_status_to_health(code: int) -> str:
    """Consul's mapping of an HTTP check's response code to a health status."""
    if 200 <= code < 300:
        return "passing"
    if code == 429:
        return "warning"
    return "critical"


def parse_host_port(target: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); raises ValueError if malformed."""
    host, sep, port_s = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise ValueError(f"a tcp check target must be HOST:PORT, not {target!r}")
    return host, int(port_s)


def validate_spec(spec: CheckSpec) -> None:
    """Raise ValueError unless ``spec`` is a check this module can run.

    ``CheckSpec`` does not validate itself, so the API layer and the state
    database call this before accepting one; :meth:`CheckRunner.start` calls
    it too, so a bad spec fails at registration, not silently in a task.
    """
    if spec.kind == "ttl":
        if not _positive(spec.ttl):
            raise ValueError("a ttl check needs a ttl above zero")
        return
    if spec.kind not in ("http", "tcp"):
        raise ValueError(f"unknown check kind {spec.kind!r}; expected ttl, http or tcp")
    if not _positive(spec.interval):
        raise ValueError(f"a {spec.kind} check needs an interval above zero")
    if not isinstance(spec.target, str):
        raise ValueError(f"a {spec.kind} check target must be a string")
    if spec.kind == "tcp":
        parse_host_port(spec.target)
    else:
        parts = urlsplit(spec.target)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"an http check target must be an http(s) URL, not {spec.target!r}")


def _positive(x: object) -> bool:
    # bool is an int; True seconds is a typo, not a duration.  NaN fails x > 0.
    return isinstance(x, int | float) and not isinstance(x, bool) and x > 0 and x != float("inf")


@dataclass(eq=False, slots=True)
class _Check:
    """One running check.  Identity matters: a stale timer or task compares
    its own ``_Check`` with the current one and does nothing if replaced."""

    spec: CheckSpec
    status: str
    output: str = ""
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None


class CheckRunner:
    """Runs one health check per instance and reports status changes.

    ``on_status(instance, status)`` is called on the event loop each time an
    instance's status changes, never for a result equal to the current one
    and never for the initial status (which the caller chose, or reads from
    :meth:`start`'s return value).  ``session_factory`` builds the aiohttp
    session for HTTP checks (tests inject one); it is called at most once, on
    the first HTTP probe, and the session is owned and closed by the runner.

    All methods must be called from the running event loop.
    """

    def __init__(
        self,
        on_status: StatusCallback,
        session_factory: SessionFactory | None = None,
    ) -> None:
        self._on_status = on_status
        self._session_factory = session_factory or _default_session
        self._session: aiohttp.ClientSession | None = None
        self._checks: dict[str, _Check] = {}
        # Every probe task not yet finished, including those of stopped checks
        # still unwinding their cancellation, so stop_all can wait for all.
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- control -------------------------------------------------------------

    def start(
        self,
        instance: str,
        spec: CheckSpec,
        initial: str | None = None,
        ttl_left: float | None = None,
    ) -> str:
        """Start (or replace) the check of ``instance``; returns its initial status.

        Without ``initial`` a new check starts critical (Consul's rule: not
        routed to until proven healthy).  Replacing a running check keeps its
        current status instead, as Consul does on re-registration, so
        re-sending an unchanged registration does not flap a healthy instance.
        ``ttl_left`` (TTL checks only) arms the first deadline that many
        seconds away instead of a whole ``ttl``: what is left of a report
        made before a restart.
        """
        if self._closed:
            raise RuntimeError("the check runner has been stopped")
        validate_spec(spec)
        if initial is not None and initial not in HEALTH:
            raise ValueError(f"status must be one of {', '.join(HEALTH)}")
        previous = self._checks.get(instance)
        if initial is None:
            initial = previous.status if previous is not None else "critical"
        self.stop(instance)
        check = _Check(spec=spec, status=initial)
        self._checks[instance] = check
        if spec.kind == "ttl":
            self._arm_ttl(instance, check, ttl_left)
        else:
            task = asyncio.get_running_loop().create_task(
                self._probe_loop(instance, check), name=f"meshd-check-{instance}"
            )
            check.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return initial

    def stop(self, instance: str) -> None:
        """Stop the check of ``instance`` (no callback).  Unknown instances are ignored."""
        check = self._checks.pop(instance, None)
        if check is None:
            return
        if check.timer is not None:
            check.timer.cancel()
        if check.task is not None:
            check.task.cancel()

    async def stop_all(self) -> None:
        """Stop every check, wait for their tasks to end, close the HTTP session."""
        self._closed = True
        for instance in list(self._checks):
            self.stop(instance)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- queries and reports -------------------------------------------------

    def report_ttl(self, instance: str, status: str) -> bool:
        """An app's own report for its TTL check; re-arms the deadline.

        False when ``instance`` has no TTL check (unknown, or an http/tcp
        check: those are not the app's to overrule).  A status outside
        passing/warning/critical is our caller's bug and raises ValueError.
        """
        if status not in HEALTH:
            raise ValueError(f"status must be one of {', '.join(HEALTH)}")
        check = self._checks.get(instance)
        if check is None or check.spec.kind != "ttl":
            return False
        self._arm_ttl(instance, check)
        self._set(instance, check, status, "reported by the app")
        return True

    def status(self, instance: str) -> str | None:
        """Current status of ``instance``'s check, None when it has none."""
        check = self._checks.get(instance)
        return None if check is None else check.status

    def output(self, instance: str) -> str | None:
        """Why the last result was what it was (for logs and the API), None if unknown."""
        check = self._checks.get(instance)
        return None if check is None else check.output

    # -- internals -------------------------------------------------------------

    def _set(self, instance: str, check: _Check, status: str, output: str) -> None:
        # A result from a check that was stopped or replaced meanwhile is stale.
        if self._checks.get(instance) is not check:
            return
        check.output = output
        if status == check.status:
            return
        log.info("check of %s: %s -> %s (%s)", instance, check.status, status, output)
        check.status = status
        try:
            self._on_status(instance, status)
        except Exception:
            # The callback is the agent's; its bug must not stop health checking.
            log.exception("status callback failed for %s", instance)

    def _arm_ttl(self, instance: str, check: _Check, delay: float | None = None) -> None:
        if check.timer is not None:
            check.timer.cancel()
        ttl = check.spec.ttl
        # Never longer than a whole TTL: a restored report cannot outlive
        # what the app said, whatever the stored deadline.
        delay = ttl if delay is None else max(0.0, min(delay, ttl))
        check.timer = asyncio.get_running_loop().call_later(
            delay, self._ttl_expired, instance, check
        )

    def _ttl_expired(self, instance: str, check: _Check) -> None:
        check.timer = None
        self._set(instance, check, "critical", f"TTL of {check.spec.ttl:g}s expired")

    async def _probe_loop(self, instance: str, check: _Check) -> None:
        spec = check.spec
        timeout = probe_timeout(spec.interval)
        probe = self._probe_http if spec.kind == "http" else self._probe_tcp
        while True:
            started = time.monotonic()
            try:
                status, output = await probe(spec.target, timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Expected failures are results (handled in the probes); this is
                # a bug or a surprise, so keep the traceback.
                log.exception("check of %s raised", instance)
                status, output = "critical", f"check failed: {type(exc).__name__}: {exc}"
            self._set(instance, check, status, output)
            # Fixed cadence: the next probe starts one interval after this one began.
            await asyncio.sleep(max(0.0, spec.interval - (time.monotonic() - started)))

    async def _probe_http(self, url: str, timeout: float) -> tuple[str, str]:
        import aiohttp

        if self._session is None:
            self._session = self._session_factory()
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                # The body is not read: the status code is the whole answer.
                return http_status_to_health(resp.status), f"HTTP GET {url}: {resp.status}"
        except TimeoutError:
            return "critical", f"HTTP GET {url}: timed out after {timeout:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            return "critical", f"HTTP GET {url}: {type(exc).__name__}: {exc}"

    async def _probe_tcp(self, target: str, timeout: float) -> tuple[str, str]:
        host, port = parse_host_port(target)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except TimeoutError:
            return "critical", f"TCP connect {target}: timed out after {timeout:g}s"
        except OSError as exc:
            return "critical", f"TCP connect {target}: {exc.strerror or exc}"
        writer.close()
        # The peer may reset as we leave; the connect already succeeded.
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return "passing", f"TCP connect {target}: success"


def _default_session() -> aiohttp.ClientSession:
    import aiohttp

    # A fresh connection per probe (as Consul does): a pooled keep-alive
    # connection could keep passing while the app no longer accepts new ones,
    # and idle sockets to every local app are a cost for nothing.  Proxy
    # variables are ignored: a probe of a local app must not go via a proxy.
    # An explicit context, verifying against the system's CA certificates,
    # with HTTP/1.1 offered by ALPN.
    tls = ssl.create_default_context()
    tls.set_alpn_protocols(["http/1.1"])
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True, ssl=tls),
        headers={"User-Agent": USER_AGENT},
        trust_env=False,
    )
