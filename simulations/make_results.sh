#!/usr/bin/env bash
# Regenerate the figures and plots of simulations/RESULTS.md (needs the plot extra:
# pip install -e '.[plot]').  Each run prints the command that made it; about two
# hours on one core at the sizes below.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000}
OUT=${OUT:-simulations/results}
run() { echo "+ python -m simulations run $*"; python -m simulations run "$@" --quiet; }
run convergence --nodes "$N" --out "$OUT/convergence"
run detection --nodes "$N" --out "$OUT/detection"
# Loss and pauses make every suspicion and refutation spread to all: these
# cost several times more events per node; run at a smaller N.
FN=${FALSE_N:-500}
run false_deaths_loss --nodes "$FN" --out "$OUT/false_deaths_loss"
run false_deaths_loss_swim --nodes "$FN" --out "$OUT/false_deaths_loss_swim"
run false_deaths_paused --nodes "$FN" --out "$OUT/false_deaths_paused"
run false_deaths_paused_swim --nodes "$FN" --out "$OUT/false_deaths_paused_swim"
run false_deaths_slow --nodes "$FN" --out "$OUT/false_deaths_slow"
run false_deaths_slow_swim --nodes "$FN" --out "$OUT/false_deaths_slow_swim"
run false_deaths_burst --nodes "$FN" --out "$OUT/false_deaths_burst"
run false_deaths_burst_swim --nodes "$FN" --out "$OUT/false_deaths_burst_swim"
run lost_cluster --nodes "$N" --out "$OUT/lost_cluster"
run lost_bridge --nodes "$N" --out "$OUT/lost_bridge"
run partition_heal --nodes "$N" --out "$OUT/partition_heal"
# Restarts contact every last-known peer (as the agent does), so churn costs
# O(N) full syncs per restart: run at a smaller N.
run churn --nodes "${CHURN_N:-300}" --out "$OUT/churn"
# Speed and memory, one process per size (peak RSS is per process); 5,000
# nodes takes about 35 minutes and 13 GB.
echo "+ python -m simulations bench convergence --nodes 100,1000,2000,5000 --out $OUT/bench"
python -m simulations bench convergence --nodes 100,1000,2000,5000 --out "$OUT/bench"
