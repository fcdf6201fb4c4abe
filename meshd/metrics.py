"""Prometheus metrics of one agent, on a registry of its own.

A registry per agent (not the process-global default) lets tests run several
agents in one process and keeps the exposition to what meshd measures.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.members = Gauge(
            "meshd_members", "Members of the pool by status.", ["status"], registry=r
        )
        self.records = Gauge(
            "meshd_records", "App records held, by whether they are served.", ["state"], registry=r
        )
        self.messages_sent = Counter(
            "meshd_messages_sent", "Gossip messages sent, by type.", ["type"], registry=r
        )
        self.messages_received = Counter(
            "meshd_messages_received", "Gossip messages received, by type.", ["type"], registry=r
        )
        self.bytes_sent = Counter(
            "meshd_bytes_sent", "Gossip bytes sent (frames), by type.", ["type"], registry=r
        )
        self.bytes_received = Counter(
            "meshd_bytes_received", "Gossip bytes received (frames), by type.", ["type"], registry=r
        )
        self.rejected = Counter(
            "meshd_rejected",
            "Frames, connections and states refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.clusters_lost = Counter(
            "meshd_clusters_lost",
            "Times this bridge's cluster watch marked another cluster unreachable.",
            registry=r,
        )
        self.lookup_seconds = Histogram(
            "meshd_lookup_seconds",
            "Time to answer a resolve from the local index.",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
            registry=r,
        )
        self.http_requests = Counter(
            "meshd_http_requests",
            "Local API requests by route and status.",
            ["route", "status"],
            registry=r,
        )

        self.storage_errors = Counter(
            "meshd_storage_errors",
            "Writes to the state directory that failed (nothing of them stored), by cause:"
            " full (disk or quota) or error (any other).",
            ["cause"],
            registry=r,
        )

        # The DNS interface (meshd/api/dns.py).  Label values come from fixed
        # sets (query types beyond the common ones count as "other"), so no
        # client can grow the exposition.
        self.dns_queries = Counter(
            "meshd_dns_queries",
            "DNS queries answered, by query type and response code.",
            ["type", "rcode"],
            registry=r,
        )
        self.dns_dropped = Counter(
            "meshd_dns_dropped",
            "DNS queries and connections dropped unanswered, by reason.",
            ["reason"],
            registry=r,
        )
        self.dns_truncated = Counter(
            "meshd_dns_truncated",
            "UDP answers cut to the asker's size, with the TC bit set.",
            registry=r,
        )
        self.dns_tcp_connections = Gauge(
            "meshd_dns_tcp_connections", "DNS-over-TCP connections open.", registry=r
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
