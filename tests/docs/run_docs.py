#!/usr/bin/env python3
"""Runs the code blocks that README.md and docs/**/*.md mark runnable, as a user would in a fresh shell.

A runnable block is a ```bash fence on the line after `<!-- runnable -->`. The blocks of one file run in
order, each in its own `bash -e` with an empty environment (HOME, a plain PATH and, when run as root, Open
MPI's run-as-root switches), in a scratch folder that looks like the checkout (its top-level entries
linked, `build` pointing at the build under test), so outputs never land in the checkout.
usage: run_docs.py REPO_ROOT BUILD_DIR
"""
import os
import pathlib
import subprocess
import sys
import tempfile

MARKER = "<!-- runnable -->"


def blocks(path):
    """(line number, code) of each runnable block in a Markdown file."""
    lines = path.read_text().splitlines()
    found = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == MARKER:
            if i + 1 >= len(lines) or lines[i + 1].strip() != "```bash":
                sys.exit(f"{path}:{i + 1}: {MARKER} must be followed by a ```bash fence")
            j = i + 2
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if j == len(lines):
                sys.exit(f"{path}:{i + 2}: unterminated code block")
            found.append((i + 2, "\n".join(lines[i + 2:j]) + "\n"))
            i = j
        i += 1
    return found


def main():
    root, build = pathlib.Path(sys.argv[1]).resolve(), pathlib.Path(sys.argv[2]).resolve()
    files = [root / "README.md"] + sorted((root / "docs").rglob("*.md"))
    env = {"HOME": os.environ.get("HOME", "/root"), "PATH": "/usr/local/bin:/usr/bin:/bin"}
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    total = 0
    for md in files:
        found = blocks(md)
        if not found:
            continue
        with tempfile.TemporaryDirectory(prefix="pardit-docs-") as scratch:
            for entry in root.iterdir():
                if entry.name not in (".git", "build", "out"):
                    os.symlink(entry, os.path.join(scratch, entry.name))
            os.symlink(build, os.path.join(scratch, "build"))
            for line, code in found:
                name = f"{md.relative_to(root)}:{line}"
                print(f"--- {name}\n{code}", end="", flush=True)
                run = subprocess.run(["bash", "-e", "-c", code], cwd=scratch, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, timeout=600)
                if run.returncode != 0:
                    print(run.stdout[-6000:])
                    sys.exit(f"FAILED: the block at {name} exited {run.returncode}")
                print(f"ok ({name})", flush=True)
                total += 1
    if total == 0:
        sys.exit("no runnable blocks found: the marker or the files moved")
    print(f"{total} runnable block(s) passed")


if __name__ == "__main__":
    main()
