"""How long each of many new records takes to reach every member of a small pool.

The simulator's convergence scenario publishes a handful of records in a big
mesh; this asks the other question, the tail at the sizes a benchmark or a
small deployment runs: in a pool of N nodes on the in-memory harness (LAN
profile, loopback-like latency, no loss), node 0 registers K new instances
one after another, and each is timed until every other node holds it.  A
record that push gossip left out at some member waits for a digest sync
there (seconds); the counts over 1 s show how often.  It runs whichever
tree comes first on ``PYTHONPATH``, so an old commit checked out with ``git
worktree add`` is measured by the same rule:

    PYTHONPATH=. python3 scripts/spread_tail.py --nodes 8,16,64 --records 200
"""

from __future__ import annotations

import argparse
import statistics

from meshd.protocol.bounds import spread_bound
from meshd.testing import Cluster, record_spread


def spreads(n: int, records: int, seed: int) -> list[float]:
    """Seconds (virtual) each new record took to reach every member."""
    c = Cluster(n, seed=seed, encode=False)
    c.run_for(30.0)
    out = []
    for k in range(records):
        spread = record_spread(c, 0, app=f"spread{k}", timeout=30.0)
        out.append(max(spread.times) if spread is not None else float("inf"))
        c.run_for(1.0)  # the queues drain between records
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="8,16,64", help="N,N,... pool sizes")
    ap.add_argument("--records", type=int, default=200, help="new records per size")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    print("| nodes | records | median s | p90 s | worst s | over 1 s | spread bound s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in (int(x) for x in args.nodes.split(",")):
        ts = sorted(spreads(n, args.records, args.seed))
        bound = spread_bound(n, Cluster(1, encode=False).config)
        print(
            f"| {n} | {len(ts)} | {statistics.median(ts):.2f} | {ts[int(0.9 * len(ts))]:.2f} "
            f"| {ts[-1]:.2f} | {sum(t > 1.0 for t in ts)} | {bound:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
