"""One node's whole protocol: its LAN core, a bridge's WAN core, the bridge between them.

Shape (aioquic's ``QuicConnection`` under its single ``transmit()`` pump): a
driver hands the host each decoded message with the pool it came on
(:meth:`Host.receive`), calls :meth:`Host.handle_timer` when
:meth:`Host.get_timer` says so, and then pulls ``(pool, address, message)``
triples to send with :meth:`Host.messages_to_send` and ``(pool, event)``
pairs with :meth:`Host.next_event`.  Everything that couples the cores
happens in here, so the asyncio agent, the in-memory harness and the
simulator drive the very same node, each with a short pump:

- after every call, events of either core go to the bridge, which may inject
  documents into the other core and restate what it knows; that makes more
  messages and events, so the host goes round until both cores are quiet
  (bounded: each pass only relays new versions);
- a bridge restates its round-trip estimates every BRIDGE_REFRESH_INTERVAL
  (they drift without any membership event), on the host's own timer;
- a bridge's cluster watch (cluster_watch.py) pings the other clusters'
  bridges on the host's timer, and sees the acks of the WAN pool before the
  WAN core does (the core ignores them: their sequence numbers are not its).

What a pass produced keeps the order the cores produced it in, so a driver
sees the same sequence whichever driver it is.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator

from meshd.protocol.bridge import LAN, WAN, Bridge
from meshd.protocol.core import Core
from meshd.protocol.events import Event
from meshd.wire import Ack, Message

__all__ = ["BRIDGE_REFRESH_INTERVAL", "Host", "LAN", "WAN"]

#: Seconds between a bridge's checks of its round-trip statement (only a
#: changed statement is re-signed, so a check costs nothing on the wire).
BRIDGE_REFRESH_INTERVAL = 5.0
#: Passes of relaying between the cores after one call: each pass relays only
#: versions the other core lacks, so two or three suffice; the cap keeps a
#: bug from spinning forever.
MAX_RELAY_PASSES = 16


class Host:
    """The cores of one node and the bridge that couples them (see module doc)."""

    # Slots, as Core's (see there).
    __slots__ = ("_events", "_next_refresh", "_out", "bridge", "cores", "lan", "wan")

    def __init__(self, lan: Core, now: float, wan: Core | None = None) -> None:
        if not lan.publisher:
            raise ValueError("the LAN core publishes this node's documents (publisher=True)")
        self.lan = lan
        self.wan = wan
        #: pool name -> core, LAN first: the order every pass visits them in.
        self.cores: dict[str, Core] = {LAN: lan}
        self.bridge: Bridge | None = None
        self._out: list[tuple[str, str, Message, str]] = []
        self._events: deque[tuple[str, Event]] = deque()
        self._next_refresh = math.inf
        if wan is not None:
            self.cores[WAN] = wan
            self.bridge = Bridge(lan, wan, now)
            self.bridge.start(now)
            self._next_refresh = now + BRIDGE_REFRESH_INTERVAL
        self._settle(now)

    @property
    def id(self) -> str:
        return self.lan.id

    def core(self, pool: str) -> Core:
        return self.cores[pool]

    # ------------------------------------------------------------------
    # Driver interface

    def receive(self, pool: str, msg: Message, now: float, peer: str | None = None) -> None:
        """A decoded message that arrived on ``pool``; ``peer`` as in :meth:`Core.receive`."""
        core = self.cores.get(pool)
        if core is None:
            return  # a pool this node is not in (a WAN message to a non-bridge)
        bridge = self.bridge
        if (
            bridge is not None
            and pool == WAN
            and isinstance(msg, Ack)
            and (peer is None or msg.source == peer)
        ):
            # Only the transport's word for who acked (the core drops the
            # message too when it claims another source).
            bridge.on_wan_ack(msg.source, msg.seq, now)
        core.receive(msg, now, peer=peer)
        self._settle(now)

    def report_refused(self, pool: str, address: str, now: float) -> None:
        """The driver's own connect to ``address`` on ``pool`` was refused
        (:meth:`Core.report_refused`)."""
        core = self.cores.get(pool)
        if core is not None:
            core.report_refused(address, now)
            self._settle(now)

    def report_closed(self, pool: str, member_or_address: str, now: float) -> None:
        """A connection on ``pool`` with a member (its id, or the address we
        dialled) ended without a goodbye (:meth:`Core.report_closed`)."""
        core = self.cores.get(pool)
        if core is not None:
            core.report_closed(member_or_address, now)
            self._settle(now)

    def report_misplaced(self, pool: str, member: str, address: str, now: float) -> None:
        """The driver's connection to ``address`` on ``pool`` proved another
        identity than ``member``'s (:meth:`Core.report_misplaced`)."""
        core = self.cores.get(pool)
        if core is not None:
            core.report_misplaced(member, address, now)
            self._settle(now)

    def get_timer(self) -> float:
        """When the host next wants :meth:`handle_timer` (the earliest of its cores)."""
        if self.bridge is None:
            return self.lan.get_timer()  # one core, no refresh (_next_refresh is inf)
        t = self._next_refresh
        if self.bridge is not None:
            t = min(t, self.bridge.watch.deadline())
        for core in self.cores.values():
            c = core.get_timer()
            if c < t:
                t = c
        return t

    def handle_timer(self, now: float) -> None:
        """Run every core whose deadline has come, and a due bridge refresh."""
        if self.bridge is None:
            # One core, no refresh: most nodes of a big simulation, every timer.
            # Not asked for its deadline first: every part of a core acts
            # only on what is due, so a call before its time does nothing.
            self.lan.handle_timer(now)
            self._settle(now)
            return
        for core in self.cores.values():
            if core.get_timer() <= now:
                core.handle_timer(now)
        bridge = self.bridge
        if bridge is not None:
            if now >= bridge.watch.deadline():
                for address, ping in bridge.tick_watch(now):
                    self._out.append((WAN, address, ping, ping.target))
            if now >= self._next_refresh:
                self._next_refresh = now + BRIDGE_REFRESH_INTERVAL
                bridge.refresh(now)
        self._settle(now)

    def messages_to_send(self) -> list[tuple[str, str, Message, str]]:
        """``(pool, address, message, recipient)`` in the order the cores made
        them; ``recipient`` as in :meth:`Core.addressed_messages`."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> tuple[str, Event] | None:
        """The next ``(pool, event)``, or None."""
        return self._events.popleft() if self._events else None

    def events(self) -> Iterator[tuple[str, Event]]:
        """Every pending ``(pool, event)``, consumed as it is iterated."""
        while self._events:
            yield self._events.popleft()

    def drop_events(self) -> None:
        """Forget pending events (a driver that watches none)."""
        self._events.clear()

    # ------------------------------------------------------------------
    # Commands that concern every pool

    def leave(self, now: float) -> None:
        """Graceful leave from every pool."""
        for core in self.cores.values():
            core.leave(now)
        self._settle(now)

    def settle(self, now: float) -> None:
        """Collect what a direct call into a core produced (``host.lan.set_app(...)``
        and the like); the drivers call it after such calls."""
        self._settle(now)

    def _settle(self, now: float) -> None:
        bridge = self.bridge
        out = self._out
        events = self._events
        if bridge is None:
            # No bridge, nothing relayed: one pass collects everything (a
            # second would find both queues empty).  Most nodes of a big
            # simulation take this path after every message and timer.
            lan = self.lan
            for addr, msg, to in lan.addressed_messages():
                out.append((LAN, addr, msg, to))
            event = lan.next_event()
            while event is not None:
                events.append((LAN, event))
                event = lan.next_event()
            return
        for _ in range(MAX_RELAY_PASSES):
            busy = False
            for pool, core in self.cores.items():
                for addr, msg, to in core.addressed_messages():
                    out.append((pool, addr, msg, to))
                event = core.next_event()
                while event is not None:
                    busy = True
                    events.append((pool, event))
                    if bridge is not None:
                        bridge.on_event(pool, event, now)
                    event = core.next_event()
            if not busy:
                break
