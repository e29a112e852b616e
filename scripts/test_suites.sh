#!/usr/bin/env bash
# `make test`'s four suites side by side: the venv's (engine, training, the pure core) and the plugin's under
# QGIS 3.22 (host), 3.40 and 3.44 (Debian 13 chroots). Much of a plugin suite's time is spent waiting on engine
# processes and QGIS, so on two cores running them together takes far less than one after the other
# (BENCHMARKS.md, "make test"). Each suite writes its own log under $GEO_R1_TEST_LOGS (default .cache/test-logs),
# printed whole as it ends; then a summary line per suite. Any suite failing, or NOT RUN, fails the whole run.
#   GEO_R1_TEST_JOBS=1   one suite at a time (the order below), e.g. to time each alone.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${GEO_R1_TEST_LOGS:-.cache/test-logs}
JOBS=${GEO_R1_TEST_JOBS:-4}
MAKE_=(make -s --no-print-directory -o setup)
names=(venv qgis-3.22 qgis-3.40 qgis-3.44)
targets=(test-engine test-plugin test-plugin-340 test-plugin-344)
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
  printf '%-10s %-6s %4s s  %s\n' "$name" "$verdict" "$secs" "$last"
done
exit $status
