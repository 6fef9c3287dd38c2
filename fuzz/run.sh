#!/usr/bin/env bash
# Builds the libFuzzer harnesses (in the clang build they share with asan/run.sh: AddressSanitizer +
# UndefinedBehaviorSanitizer, launch/sanitize_build.sh) and runs each on a copy of its seed corpus, two at a
# time, for SECONDS (default $PARDIT_FUZZ_SECONDS, else 60) or, with --runs N, for N executions each. Any
# crash, sanitizer report, leak, timeout or exception other than pardit::Error fails the run; the reproducer is
# kept in OUT/runs/<harness>/ and named in the output. Prints the executions per harness.
#   fuzz/run.sh [SECONDS | --runs N] [OUT]   (OUT: the build folder, default build-sanitize/)
# The test suite runs 10 s per harness (fuzz.parsers); the long run is  fuzz/run.sh --runs 1000000
# (a million executions per harness; fuzz_config, the slowest, makes about 170 a second). Reproduce a finding:
# OUT/fuzz/<harness> <file>.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
limit=(-max_total_time="${PARDIT_FUZZ_SECONDS:-60}") what="${PARDIT_FUZZ_SECONDS:-60} s"
if [[ "${1:-}" == "--runs" ]]; then
  [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || { echo "fuzz/run.sh: --runs takes a positive count" >&2; exit 2; }
  limit=(-runs="$2") what="a limit of $2 runs"; shift 2
elif [[ -n "${1:-}" ]]; then
  [[ "$1" =~ ^[1-9][0-9]*$ ]] || { echo "fuzz/run.sh: SECONDS must be a positive count, got '$1'" >&2; exit 2; }
  limit=(-max_total_time="$1") what="$1 s"; shift
fi
out="${1:-$root/build-sanitize}"
"$root/launch/sanitize_build.sh" "$out" pardit_fuzzers
harnesses=(fuzz_safetensors fuzz_checkpoint_json fuzz_config fuzz_png fuzz_tokenizers)
run_one() {
  local h="$1" work="$out/runs/$1"
  rm -rf "$work" && mkdir -p "$work/corpus" && cp "$root/fuzz/corpus/$h/"* "$work/corpus/"
  # Leaks are checked; LibTorch's own start-up allocations are not ours.
  (cd "$work" && ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 \
     "$out/fuzz/$h" "${limit[@]}" -max_len=32768 -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 \
     corpus >"$work/log" 2>&1)
}
status=0
pids=()
for h in "${harnesses[@]}"; do
  run_one "$h" & pids+=($!)
  if (( ${#pids[@]} == 2 )); then wait "${pids[0]}" || true; pids=("${pids[1]}"); fi
done
wait || true
for h in "${harnesses[@]}"; do
  log="$out/runs/$h/log"
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  if grep -qE "ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:|SUMMARY: " "$log"; then
    echo "fuzz: $h FAILED after ${runs:-?} runs:"; grep -E "ERROR|runtime error|SUMMARY|what\(\)|Test unit written" "$log" | head -8
    status=1
  else
    echo "fuzz: $h ok, ${runs:-?} runs ($what)"
  fi
done
exit $status
