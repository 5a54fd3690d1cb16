#!/usr/bin/env bash
# The rest of the ladder's queue after 18:52: at 18:42 a second process (not this helper's) started
# `bash shapes/ladder.sh losses lora 0 1 2` in this worktree, so the losses run there; this queue does the
# remaining rung seeds, checks the winner rule, then the overfit check and the tiny-sd1.5 run.
# (shapes/ladder.sh is not edited while it runs: bash reads a running script from its file offset.)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=/dev/null
source shapes/ladder.sh true     # the functions; the phase `true` does nothing
rungs 1 2
param=$(python docs/ladder/analyse.py --winner)
echo "$param" > "$D/winner.txt"
commit "winner by the rule over all seeds: $param"
overfit
bash shapes/sd15_fix.sh
