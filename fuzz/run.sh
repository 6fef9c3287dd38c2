#!/usr/bin/env bash
# Builds the libFuzzer harnesses (clang, AddressSanitizer + UndefinedBehaviorSanitizer) and runs each on a
# copy of its seed corpus for SECONDS (default 60), two at a time. Any crash, sanitizer report, leak, timeout
# or exception other than pardit::Error fails the run; the reproducer is kept in OUT/<harness>/ and named in
# the output. Prints the executions per harness.
#   fuzz/run.sh [SECONDS] [OUT]   (OUT: a work folder, default build-fuzz/)
# Reproduce a finding: build-fuzz/fuzz/<harness> <file>. Longer local runs: fuzz/run.sh 3600.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds="${1:-60}" out="${2:-$root/build-fuzz}"
"$root/launch/clang_build.sh" "$out" pardit_fuzzers -DPARDIT_FUZZ=ON -DPARDIT_BUILD_TESTS=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo
harnesses=(fuzz_safetensors fuzz_checkpoint_json fuzz_config fuzz_png fuzz_tokenizers)
run_one() {
  local h="$1" work="$out/runs/$1"
  rm -rf "$work" && mkdir -p "$work/corpus" && cp "$root/fuzz/corpus/$h/"* "$work/corpus/"
  # Leaks are checked; LibTorch's own start-up allocations are not ours.
  (cd "$work" && ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 \
     "$out/fuzz/$h" -max_total_time="$seconds" -max_len=32768 -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 \
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
    echo "fuzz: $h ok, ${runs:-?} runs in ${seconds} s"
  fi
done
exit $status
