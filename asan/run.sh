#!/usr/bin/env bash
# The unit tests and the 2-rank MPI tests under AddressSanitizer + UndefinedBehaviorSanitizer: builds pardit,
# pardit_unit_tests and pardit_mpi_tests in the clang build it shares with the fuzzers
# (launch/sanitize_build.sh; OUT, default build-sanitize/) and runs them. Any sanitizer report fails the run
# (UBSan does not recover); leaks are checked in the unit test binary, not in the processes under MPI (see
# below).
#   asan/run.sh [OUT]
# Reproduce one test: ASAN_OPTIONS=detect_leaks=1 OUT/tests/pardit_unit_tests --gtest_filter=Suite.Name
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/build-sanitize}"
start=$SECONDS
"$root/launch/sanitize_build.sh" "$out" pardit,pardit_unit_tests,pardit_mpi_tests
echo "asan: built in $((SECONDS - start)) s"
export OMP_NUM_THREADS=1 UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
asan="allocator_may_return_null=1:detect_stack_use_after_return=0"
status=0
# Leaks are checked in the test binary; not in the pardit processes the command-line tests (Cli.*) start,
# where Open MPI keeps allocations until exit from components it has unloaded (no frame to suppress by).
run_unit() {  # NAME LEAKS GTEST-ARGS...: one run of the unit tests, its log in OUT/NAME.log
  local name="$1" leaks="$2"; shift 2
  (cd "$out" && ASAN_OPTIONS="$asan:detect_leaks=$leaks" tests/pardit_unit_tests --gtest_brief=1 "$@" \
     >"$out/$name.log" 2>&1)
}
report() {  # NAME: the run's summary, or its failures
  local log="$out/$1.log"
  if grep -qE "ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|^\[  FAILED  \]" "$log" ||
     ! grep -q "^\[  PASSED  \]" "$log"; then
    echo "asan: unit tests ($1) FAILED:"; grep -E -A30 "ERROR: |runtime error:|FAILED" "$log" | head -80
    return 1
  fi
  echo "asan: unit tests ($1): $(grep -E '^\[  PASSED  \]' "$log")$(grep -E '^\[  SKIPPED \] [0-9]' "$log" | sed 's/^/, /')"
}
start=$SECONDS
# Two halves at once (one per core), then the command-line tests.
GTEST_TOTAL_SHARDS=2 GTEST_SHARD_INDEX=0 run_unit half-0 1 --gtest_filter=-Cli.* & a=$!
GTEST_TOTAL_SHARDS=2 GTEST_SHARD_INDEX=1 run_unit half-1 1 --gtest_filter=-Cli.* & b=$!
wait $a || true; wait $b || true
run_unit cli 0 --gtest_filter=Cli.* || true
for name in half-0 half-1 cli; do report $name || status=1; done
echo "asan: unit tests ran in $((SECONDS - start)) s"
# The MPI tests on 2 ranks (USP, CFG, PipeFusion and the metrics file against one rank).
start=$SECONDS
mpiexec="${MPIEXEC:-mpiexec}"
if ASAN_OPTIONS="$asan:detect_leaks=0" "$mpiexec" -n 2 --oversubscribe "$out/tests/pardit_mpi_tests" \
     >"$out/mpi.log" 2>&1 && ! grep -qE "ERROR: AddressSanitizer|runtime error:" "$out/mpi.log"; then
  echo "asan: 2-rank MPI tests: $(grep -aoE 'PASSED .*' "$out/mpi.log" | tr -d '\033' | sed 's/\[m//g') in $((SECONDS - start)) s"
else
  echo "asan: 2-rank MPI tests FAILED:"; grep -E -A30 "ERROR: |runtime error:|FAILED" "$out/mpi.log" | head -80
  status=1
fi
exit $status
