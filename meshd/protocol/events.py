"""Events the core hands to its driver (pull them with ``Core.next_event``)."""

from __future__ import annotations

from dataclasses import dataclass

from meshd.wire import Status


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every core event."""


@dataclass(frozen=True, slots=True)
class MemberChanged(Event):
    """Our view of ``member`` moved to ``status`` (joined, suspected, died, left, came back)."""

    member: str
    status: Status
    incarnation: int
    address: str


@dataclass(frozen=True, slots=True)
class OriginChanged(Event):
    """What ``origin`` publishes changed: a new version, or it stopped/started being served."""

    origin: str
    version: int
    live: bool
