#!/bin/bash
# tools/bench/sigstorm_revert.sh: issue 7 §1, a strict revert under a `kill -RTMIN` stream, N runs.
# usage: sigstorm_revert.sh HOTFIX_CTL FIXTURES_DIR RUNS  -- strict revert under a kill -RTMIN stream
CTL=$1; FX=$2; RUNS=${3:-20}
deaths=0; ok=0; patchfail=0; revertfail=0; held=0
for i in $(seq 1 $RUNS); do
  coproc T { SIGSTORM_SPIN=${SPIN:-2000} exec "$FX/sigstorm"; }
  pid=$T_PID
  while read -r line <&"${T[0]}"; do [[ $line == ready ]] && break; done
  if ! "$CTL" patch --pid $pid --lib "$FX/sigstorm_fix.so" --consistency ${PATCH_MODE:-strict} > ${TMPDIR:-/tmp}/patch.$i 2>&1; then
    patchfail=$((patchfail+1)); kill -9 $pid; wait $pid 2>/dev/null; continue
  fi
  ( while :; do kill -RTMIN $pid 2>/dev/null || exit; done ) & killer=$!
  "$CTL" revert --pid $pid --all > ${TMPDIR:-/tmp}/revert.$i 2>&1; rc=$?
  sleep 0.3
  kill $killer 2>/dev/null; wait $killer 2>/dev/null
  sleep 0.2
  if kill -0 $pid 2>/dev/null && [[ $(awk '{print $3}' /proc/$pid/stat) != Z ]]; then
    ok=$((ok+1)); [[ $rc != 0 ]] && revertfail=$((revertfail+1)); grep -q "held" ${TMPDIR:-/tmp}/revert.$i && held=$((held+1))
    kill -9 $pid
  else
    deaths=$((deaths+1)); echo "run $i: target died; revert rc=$rc: $(tail -1 ${TMPDIR:-/tmp}/revert.$i)"
  fi
  wait $pid 2>/dev/null; st=$?
  [[ $st != 137 && $st != 0 ]] && echo "run $i: exit status $st"
done
echo "runs=$RUNS deaths=$deaths alive=$ok revert_failed=$revertfail held=$held patch_failed=$patchfail"
