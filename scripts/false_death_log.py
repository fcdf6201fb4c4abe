"""Run a simulator scenario and log every false death with who said it and when.

The simulator's results count false deaths; this says which ones a slow node
was behind.  It wraps ``python -m simulations run`` of whichever tree comes
first on ``PYTHONPATH`` (so an old commit's simulator, checked out with
``git worktree add``, can be compared with today's by the same rule), writes
one JSON line per dead verdict about a running node, and at the end prints
how many were about a node that was

- ``slow``: slow at the time;
- ``lagging``: no longer slow, but for less than ``--lag`` seconds (what was
  sent to it while it was slow is still on its way; the simulator's own
  ``false_deaths_lagging``);
- ``healthy``: neither (the Lifeguard guarantee's figure);

and how many of each came from an observer that was itself slow.

    PYTHONPATH=. python3 scripts/false_death_log.py LOG.jsonl -- \\
        run false_deaths_slow --nodes 1000 --no-plots --quiet
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def classify(row: dict[str, Any], lag: float) -> str:
    if row["subject_slow_now"]:
        return "slow"
    spans = row["subject_slow"]
    if spans and spans[-1][1] is not None and row["t"] < spans[-1][1] + lag:
        return "lagging"
    return "healthy"


def summarize(rows: list[dict[str, Any]], lag: float) -> str:
    kinds = Counter(classify(r, lag) for r in rows)
    by_slow = Counter(classify(r, lag) for r in rows if r["observer_slow_now"])
    subjects = len({r["subject"] for r in rows})
    return (
        f"{len(rows)} false deaths about {subjects} nodes: "
        + ", ".join(f"{kinds[k]} {k}" for k in ("slow", "lagging", "healthy"))
        + "; of them said by a slow observer: "
        + ", ".join(f"{by_slow[k]} {k}" for k in ("slow", "lagging", "healthy"))
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("log", type=Path, help="JSON lines, one per false death")
    ap.add_argument("--lag", type=float, default=5.0, help="the scenario's slow delay, s")
    ap.add_argument("sim_args", nargs=argparse.REMAINDER, help="-- then `simulations` arguments")
    args = ap.parse_args(argv)
    sim_args = args.sim_args[1:] if args.sim_args[:1] == ["--"] else args.sim_args

    from simulations import __main__ as sim_main
    from simulations import faults, metrics

    slow_spans: dict[int, list[list[float | None]]] = {}
    seen: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    out = args.log.open("w")
    plain_slow, plain_unslow = faults.FaultSchedule._slow, faults.FaultSchedule._unslow
    plain_dead = metrics.Collector._on_dead

    def slow(self: Any, f: Any) -> None:
        seen["sim"] = self.sim
        before = set(self.sim.net.slow)
        plain_slow(self, f)
        for i in set(self.sim.net.slow) - before:
            slow_spans.setdefault(i, []).append([self.sim.now, None])

    def unslow(self: Any, i: int) -> None:
        plain_unslow(self, i)
        slow_spans[i][-1][1] = self.sim.now

    def on_dead(self: Any, i: int, e: Any, now: float) -> None:
        before = self.false_deaths
        plain_dead(self, i, e, now)
        if self.false_deaths == before:
            return
        subject = self.index_of.get(e.member)
        sim = seen.get("sim")
        row = {
            "t": round(now, 3),  # virtual time, as the slow spans
            "observer": i,
            "subject": subject,
            "incarnation": e.incarnation,
            "subject_slow": slow_spans.get(subject, []),
            "subject_slow_now": sim is not None and subject in sim.net.slow,
            "observer_slow_now": sim is not None and i in sim.net.slow,
        }
        rows.append(row)
        out.write(json.dumps(row) + "\n")

    faults.FaultSchedule._slow = slow  # type: ignore[method-assign]
    faults.FaultSchedule._unslow = unslow  # type: ignore[method-assign]
    metrics.Collector._on_dead = on_dead  # type: ignore[method-assign]
    try:
        code = sim_main.main(sim_args)
    finally:
        out.close()
    print(summarize(rows, args.lag))
    return code


if __name__ == "__main__":
    sys.exit(main())
