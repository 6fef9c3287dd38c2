#!/usr/bin/env python3
"""Fetches the real FLUX.1 tokenizer vocabularies for the tokenizer tests, without committing them.

The source distribution of the PyPI package stable-diffusion-cpp-python 0.4.7 carries CLIP's BPE merges
and T5's tokenizer.json as byte arrays (src/tokenizers/vocab/clip_t5.hpp). This script downloads it once
into a cache, extracts both, derives CLIP's vocab.json from the merges (256 byte symbols, the same with
"</w>", one token per merge, then <|startoftext|> and <|endoftext|>), and writes
    OUT/clip/vocab.json, OUT/clip/merges.txt        (the layout of FLUX.1's tokenizer/)
    OUT/clip_json/tokenizer.json                    (the same BPE as a tokenizer.json)
    OUT/t5/tokenizer.json                           (FLUX.1's tokenizer_2/tokenizer.json)
Only the Python standard library and pip are needed.
    real_vocab.py OUT [--cache DIR] [--pip PIP]
Exit status 77 when the package cannot be downloaded (no network): the tests skip visibly.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tarfile

PACKAGE = "stable-diffusion-cpp-python==0.4.7"
MEMBER = "vendor/stable-diffusion.cpp/src/tokenizers/vocab/clip_t5.hpp"


def byte_alphabet():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def arrays(header_text):
    out = {}
    for m in re.finditer(r"(\w+)\s*\[\]\s*=\s*\{([^}]*)\}", header_text):
        out[m.group(1)] = bytes(int(x, 16) for x in re.findall(r"0x([0-9a-fA-F]{2})", m.group(2))).rstrip(b"\0")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "pardit", "vocab"))
    ap.add_argument("--pip", default=None)
    a = ap.parse_args()
    os.makedirs(a.cache, exist_ok=True)
    tarballs = [f for f in os.listdir(a.cache) if f.startswith("stable_diffusion_cpp_python-0.4.7") and f.endswith(".tar.gz")]
    if not tarballs:
        pip = [a.pip] if a.pip else [sys.executable, "-m", "pip"]
        r = subprocess.run(pip + ["download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", a.cache],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tarballs = [f for f in os.listdir(a.cache) if f.startswith("stable_diffusion_cpp_python-0.4.7") and f.endswith(".tar.gz")]
        if r.returncode != 0 or not tarballs:
            print("cannot download " + PACKAGE + ":\n" + r.stdout[-2000:], file=sys.stderr)
            return 77
    with tarfile.open(os.path.join(a.cache, tarballs[0])) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(MEMBER))
        found = arrays(tar.extractfile(member).read().decode("ascii"))
    merges_text = found["clip_merges_utf8_c_str"].decode("utf-8")
    t5_json = found["t5_tokenizer_json_str"].decode("utf-8")
    lines = [l for l in merges_text.split("\n") if l and not l.startswith("#version")]
    merges = [tuple(l.split(" ")) for l in lines]
    symbols = byte_alphabet()
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    for d in ("clip", "clip_json", "t5"):
        os.makedirs(os.path.join(a.out, d), exist_ok=True)
    with open(os.path.join(a.out, "clip", "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(a.out, "clip", "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(lines) + "\n")
    with open(os.path.join(a.out, "clip_json", "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump({"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": [list(m) for m in merges],
                                               "end_of_word_suffix": "</w>"}}, f, ensure_ascii=False)
    with open(os.path.join(a.out, "t5", "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(t5_json)
    print(f"CLIP: {len(vocab)} tokens, {len(merges)} merges; T5: tokenizer.json of {len(t5_json)} bytes -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
