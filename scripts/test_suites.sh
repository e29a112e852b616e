#!/usr/bin/env bash
# `make test`'s suites side by side: the venv's (engine, training, the pure core; in two halves) and the plugin's under
# QGIS 3.22 (host), 3.40 and 3.44 (Debian 13 chroots). One suite keeps about one core busy (a pytest process
# waiting on its engine processes in turn: the QGIS 3.22 suite used 6.4 CPU-minutes in 9.0 minutes), so two at
# a time on two cores should take about half the time of one after the other (BENCHMARKS.md, "make test"). Each suite writes its own log under $GEO_R1_TEST_LOGS (default .cache/test-logs),
# printed whole as it ends; then a summary line per suite. Any suite failing, or NOT RUN, fails the whole run.
#   GEO_R1_TEST_JOBS=N   N suites at a time (default: one per CPU core, at most 4; 1: one after the other, in the
#                        order below). More suites than cores make the tests with short network timeouts (5 s)
#                        time out on a loaded machine.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${GEO_R1_TEST_LOGS:-.cache/test-logs}
cores=$(nproc 2>/dev/null || echo 2)
JOBS=${GEO_R1_TEST_JOBS:-$(( cores < 4 ? cores : 4 ))}
MAKE_=(make -s --no-print-directory -o setup)
# The venv suite in two halves (make test-engine-processes, test-engine-rest): whole, it was the one long job
# that ended last (820 s beside 646, 313 and 255 s). The order fills two cores best with the measured times.
names=(qgis-3.22 venv-processes qgis-3.40 venv-rest qgis-3.44)
targets=(test-plugin test-engine-processes test-plugin-340 test-engine-rest test-plugin-344)
mkdir -p "$LOGS"
rm -f "$LOGS"/*.rc "$LOGS"/*.log
t0=$(date +%s)
for i in "${!names[@]}"; do
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
  name=${names[$i]}
  echo "[test] ${name}: started (make ${targets[$i]}; log $LOGS/$name.log)"
  (
    s=$(date +%s)
    "${MAKE_[@]}" "${targets[$i]}" >"$LOGS/$name.log" 2>&1
    echo "$? $(( $(date +%s) - s ))" >"$LOGS/$name.rc"
  ) &
done
printed=()
while (( ${#printed[@]} < ${#names[@]} )); do
  for name in "${names[@]}"; do
    [[ -f "$LOGS/$name.rc" && " ${printed[*]} " != *" $name "* ]] || continue
    read -r rc secs <"$LOGS/$name.rc"
    echo "================================ $name: exit $rc in $secs s ================================"
    cat "$LOGS/$name.log"
    printed+=("$name")
  done
  (( ${#printed[@]} < ${#names[@]} )) && sleep 2
done
wait
status=0
echo "================================ make test: $(( $(date +%s) - t0 )) s, $JOBS at a time ================================"
for name in "${names[@]}"; do
  read -r rc secs <"$LOGS/$name.rc"
  last=$(grep -E "(passed|failed|error|NOT RUN)" "$LOGS/$name.log" | tail -n 1)
  verdict=ok; [[ $rc -ne 0 ]] && { verdict=FAILED; status=1; }
  printf '%-15s %-6s %4s s  %s\n' "$name" "$verdict" "$secs" "$last"
done
exit $status
