#!/usr/bin/env bash
# Regenerate the figures and plots of simulations/RESULTS.md (needs the plot extra:
# pip install -e '.[plot]').  Each run prints the command that made it.  Two
# halves that can run side by side on two cores: `make_results.sh scenarios`
# (about 15 minutes) and `make_results.sh bench` (about 20 minutes, 10,000
# nodes included); no argument runs both, one after the other.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000}
OUT=${OUT:-simulations/results}
what=${1:-all}
run() { echo "+ python -m simulations run $*"; python -m simulations run "$@" --quiet; }
bench() { echo "+ python -m simulations bench $*"; python -m simulations bench "$@"; }
if [[ $what == all || $what == scenarios ]]; then
  run convergence --nodes "$N" --out "$OUT/convergence"
  run detection --nodes "$N" --out "$OUT/detection"
  # Loss and pauses make every suspicion and refutation spread to all: these
  # cost several times more events per node; run at a smaller N.
  FN=${FALSE_N:-500}
  for s in loss paused slow burst; do
    run "false_deaths_$s" --nodes "$FN" --out "$OUT/false_deaths_$s"
    run "false_deaths_${s}_swim" --nodes "$FN" --out "$OUT/false_deaths_${s}_swim"
  done
  run lost_cluster --nodes "$N" --out "$OUT/lost_cluster"
  run lost_bridge --nodes "$N" --out "$OUT/lost_bridge"
  run partition_heal --nodes "$N" --out "$OUT/partition_heal"
  # A restart contacts every last-known peer (as the agent does): O(N) joins
  # per restart, so churn runs at a smaller N.
  run churn --nodes "${CHURN_N:-300}" --out "$OUT/churn"
fi
if [[ $what == all || $what == bench ]]; then
  # Speed, memory and per-node load vs N, one process per size (peak RSS is
  # per process).
  bench convergence --nodes 100,1000,2000,5000,10000 --out "$OUT/bench"
  bench detection --nodes 100,1000,5000 --out "$OUT/detection_vs_n"
fi
