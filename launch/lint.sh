#!/usr/bin/env bash
# Style and static checks of the C++ sources, run by the test suite (label lint):
#   * clang-format (.clang-format): every tracked .h/.cpp/.cu is formatted, its includes sorted;
#     `launch/lint.sh --fix` formats them in place;
#   * clang-tidy (.clang-tidy: a small set of bug-finding checks) on the library's sources, with the
#     build's compile commands (BUILD, default build/); warnings are errors.
# Exits 77 (a skip in CTest) when clang-format or clang-tidy is missing (launch/install.sh --fuzz installs
# them with clang).
#   launch/lint.sh [--fix] [BUILD]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fix=0
if [[ "${1:-}" == "--fix" ]]; then fix=1; shift; fi
build="${1:-$root/build}"
command -v clang-format >/dev/null && command -v clang-tidy >/dev/null ||
  { echo "SKIP: clang-format and clang-tidy not found (launch/install.sh --fuzz)"; exit 77; }
cd "$root"
mapfile -t files < <(git ls-files '*.cpp' '*.h' '*.cu')
if ((fix)); then clang-format -i "${files[@]}"; echo "lint: formatted ${#files[@]} files"; exit 0; fi
status=0
bad=()
for f in "${files[@]}"; do clang-format --dry-run -Werror "$f" >/dev/null 2>&1 || bad+=("$f"); done
if ((${#bad[@]})); then
  echo "lint: ${#bad[@]} file(s) are not formatted as .clang-format says (launch/lint.sh --fix):"
  for f in "${bad[@]:0:20}"; do echo "  $f"; clang-format --dry-run "$f" 2>&1 | head -6 | sed 's/^/    /'; done
  status=1
else
  echo "lint: clang-format: ${#files[@]} files formatted"
fi

# clang-tidy on the library's and the command line's sources, with the build's compile commands. The build's
# precompiled header is GCC's; the checks get a clang one of the same header and flags (ATen parsed once).
[[ -f "$build/compile_commands.json" ]] || { echo "lint: no $build/compile_commands.json (build first)"; exit 1; }
lint="$build/lint"
mkdir -p "$lint"
python3 - "$build/compile_commands.json" "$lint" "$root" <<'PY'
import json, re, shlex, sys
commands, lint, root = sys.argv[1], sys.argv[2], sys.argv[3]
kept, pch_flags = [], None
for e in json.load(open(commands)):
    f = e["file"]
    if not f.startswith(root + "/src/") or not f.endswith(".cpp"):
        continue
    args = shlex.split(e["command"])
    if pch_flags is None and any("cmake_pch.hxx" in a for a in args):
        flags, i = [], 1
        while i < len(args):
            a = args[i]
            if a in ("-isystem", "-I", "-D"):
                flags += [a, args[i + 1]]; i += 2; continue
            if a.startswith(("-I", "-D", "-std=", "-O")):
                flags.append(a)
            i += 1
        pch_flags = flags
    cmd = re.sub(r"-include \S*cmake_pch\.hxx", "-include-pch " + lint + "/pch.h.pch", e["command"])
    e["command"] = cmd.replace("-Winvalid-pch", "")
    kept.append(e)
json.dump(kept, open(lint + "/compile_commands.json", "w"), indent=1)
open(lint + "/files.txt", "w").write("\n".join(e["file"] for e in kept) + "\n")
open(lint + "/pch_flags.txt", "w").write(" ".join(shlex.quote(a) for a in pch_flags or []))
PY
# shellcheck disable=SC2046
eval clang++ -x c++-header $(cat "$lint/pch_flags.txt") "$root/src/pch.h" -o "$lint/pch.h.pch"
jobs="${PARDIT_JOBS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
mapfile -t sources <"$lint/files.txt"
log="$lint/clang-tidy.log"
if printf '%s\n' "${sources[@]}" | xargs -P "$jobs" -n 4 clang-tidy -p "$lint" --quiet >"$log" 2>&1; then
  echo "lint: clang-tidy (.clang-tidy): ${#sources[@]} sources, no findings"
else
  echo "lint: clang-tidy found problems:"; grep -E "(warning|error):" "$log" | sort -u | head -40
  status=1
fi
exit $status
