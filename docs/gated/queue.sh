#!/bin/bash
# The queue of docs/gated/: one job at a time on core $CORE (default 1), one torch thread, from a worktree of a
# commit.
# Jobs are lines "NAME<TAB>COMMAND" or "NAME<TAB>COMMIT<TAB>COMMAND" in $JOBS, run in order; a job whose
# $DONE/NAME.done exists is skipped (so the queue is resumable), one that fails leaves $DONE/NAME.failed and
# the queue goes on. Before each job the run worktree is checked out at the job's COMMIT, or else the commit
# in $COMMIT_FILE, so each job runs committed code (and one table's jobs can keep one commit while others
# move on); its commit, whether that tree was clean, its start, end and exit status go to $DONE/times.csv.
#   bash docs/gated/queue.sh            (from the science worktree; RUN_TREE is a detached worktree)
SCI=${SCI:-$(cd "$(dirname "$0")/../.." && pwd)}
RUN_TREE=${RUN_TREE:-/work/wt-run}
JOBS=${JOBS:-$SCI/runs/gated/jobs.tsv}
DONE=${DONE:-$SCI/runs/gated/done}
COMMIT_FILE=${COMMIT_FILE:-$SCI/runs/gated/commit}
mkdir -p "$DONE"
export OMP_NUM_THREADS=1 SCI
while true; do
  [ -e "$SCI/runs/gated/STOP" ] && exit 0
  job=""
  while IFS=$'\t' read -r name field2 field3; do
    [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
    if [ -n "$field3" ]; then pinned="$field2"; cmd="$field3"; else pinned=""; cmd="$field2"; fi
    [ -e "$DONE/$name.done" ] || [ -e "$DONE/$name.failed" ] || { job="$name"; command="$cmd"; job_commit="$pinned"; break; }
  done < "$JOBS"
  if [ -z "$job" ]; then sleep 20; continue; fi
  commit=${job_commit:-$(cat "$COMMIT_FILE")}
  git -C "$RUN_TREE" checkout -q --detach "$commit" || exit 1
  dirty=$(git -C "$RUN_TREE" status --porcelain --untracked-files=no | wc -l)
  start=$(date -u +%FT%TZ); t0=$(date +%s)
  (cd "$RUN_TREE" && taskset -c "${CORE:-1}" nice -n 0 bash -c "$command") > "$DONE/$job.log" 2>&1
  rc=$?
  echo "$job,$commit,dirty=$dirty,$start,$(date -u +%FT%TZ),$(( $(date +%s) - t0 )),rc=$rc" >> "$DONE/times.csv"
  if [ $rc = 0 ]; then touch "$DONE/$job.done"; else touch "$DONE/$job.failed"; fi
done
