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
# A source found clean is remembered in a cache (~/.cache/pardit/lint) under a key of everything its result
# depends on: clang-tidy's version, .clang-tidy, its compile command, its text and the text of every project
# header (LibTorch's headers are pinned by the include paths in the command); only the others are checked.
[[ -f "$build/compile_commands.json" ]] || { echo "lint: no $build/compile_commands.json (build first)"; exit 1; }
lint="$build/lint"
cache="${PARDIT_LINT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pardit/lint}"
mkdir -p "$lint" "$cache"
clang-tidy --version >"$lint/version.txt"
python3 - "$build/compile_commands.json" "$lint" "$root" "$cache" <<'PY'
import glob, hashlib, json, os, re, shlex, sys
commands, lint, root, cache = sys.argv[1:5]
def digest(*parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode()); h.update(b"\0")
    return h.hexdigest()
headers = sorted(glob.glob(root + "/include/**/*.h", recursive=True) + glob.glob(root + "/src/**/*.h", recursive=True))
common = digest(open(lint + "/version.txt").read(), open(root + "/.clang-tidy").read(),
                *[os.path.relpath(h, root) + open(h, "rb").read().decode("utf-8", "replace") for h in headers])
kept, todo, pch_flags = [], [], None
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
    key = digest(common, e["command"].replace(root, "<root>").replace(os.path.dirname(commands), "<build>"),
                 os.path.relpath(f, root), open(f, "rb").read().decode("utf-8", "replace"))
    if not os.path.exists(os.path.join(cache, key)):
        todo.append(f + "\t" + os.path.join(cache, key))
json.dump(kept, open(lint + "/compile_commands.json", "w"), indent=1)
open(lint + "/todo.txt", "w").write("".join(t + "\n" for t in todo))
open(lint + "/count.txt", "w").write(str(len(kept)))
open(lint + "/pch_flags.txt", "w").write(" ".join(shlex.quote(a) for a in pch_flags or []))
PY
total=$(cat "$lint/count.txt")
mapfile -t todo <"$lint/todo.txt"
log="$lint/clang-tidy.log"
: >"$log"
if ((${#todo[@]})); then
  # shellcheck disable=SC2046
  eval clang++ -x c++-header $(cat "$lint/pch_flags.txt") "$root/src/pch.h" -o "$lint/pch.h.pch"
  jobs="${PARDIT_JOBS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
  export lint
  # shellcheck disable=SC2016
  printf '%s\n' "${todo[@]}" | tr '\t' '\n' | xargs -P "$jobs" -n 2 bash -c \
    'out="$(clang-tidy -p "$lint" --quiet "$0" 2>&1)" && touch "$1" || { printf "%s\n" "$out"; exit 1; }' >"$log" 2>&1 || true
fi
unchecked=0
for t in "${todo[@]}"; do [[ -f "${t#*$'\t'}" ]] || unchecked=$((unchecked + 1)); done
if ((unchecked)); then
  echo "lint: clang-tidy: $unchecked of $total sources are not clean:"
  grep -E "(warning|error):" "$log" | sort -u | head -40
  grep -qE "(warning|error):" "$log" || tail -20 "$log"
  status=1
else
  echo "lint: clang-tidy (.clang-tidy): $total sources clean ($((total - ${#todo[@]})) remembered, ${#todo[@]} checked)"
fi
exit $status
