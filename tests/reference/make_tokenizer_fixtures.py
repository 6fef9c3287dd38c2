#!/usr/bin/env python3
"""Builds the tokenizer fixtures: a corpus of prompts and the ids transformers gives them.

Run by hand (CI uses the committed output; the vocabularies themselves are never committed):
    launch/install.sh --reference && $PARDIT_VENV/bin/python tests/reference/make_tokenizer_fixtures.py

Writes tests/fixtures/tokenizer_corpus.json:
  * 2,400 prompts (plain English, mixed case, punctuation and contractions, numbers, accents and combining
    marks, CJK, Arabic/Hebrew/Thai/Devanagari/Cyrillic, emoji with skin tones, flags and ZWJ sequences,
    whitespace runs, tabs and newlines, leading and trailing spaces, very long, empty, special tokens in
    the text, compatibility characters (ligatures, full-width, superscripts) and control characters),
  * for each, the ids of transformers' CLIPTokenizer (FLUX.1's tokenizer/) and T5TokenizerFast
    (tokenizer_2/) built from the real vocabularies that tests/text/real_vocab.py extracts.
"""
import json
import os
import random
import subprocess
import sys
import tempfile

from transformers import CLIPTokenizer, T5TokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "tokenizer_corpus.json")

WORDS = ("a cat dog sitting on the mat photo of an astronaut riding horse in space highly detailed oil painting "
         "cinematic lighting portrait landscape mountains lake sunset golden hour bokeh 8k ultra realistic render "
         "digital art concept by greg trending artstation city street night neon rain reflections futuristic robot "
         "forest fog morning dew flowers garden vintage film grain wide angle macro shot studio soft light watercolor "
         "sketch pencil drawing anime style character design fantasy castle dragon knight armor sword magic spell "
         "ocean waves beach palm trees tropical island cozy cabin snow winter coffee cup book table window view").split()
ACCENTED = ["café", "naïve", "Ångström", "Zürich", "résumé", "São Paulo", "Kraków", "façade", "smörgåsbord",
            "coöperate", "jalapeño", "Dvořák", "Øresund", "crème brûlée", "e\u0301t\u00e9", "A\u030a", "n\u0303o"]
SCRIPTS = ["一只在月球上的猫", "日本語のテキスト", "東京タワー", "한국어 문장", "中文，标点。", "Привет мир", "Ελληνικά ΣΟΦΙΑ",
           "مرحبا بالعالم", "שלום עולם", "สวัสดีครับ", "नमस्ते दुनिया", "İstanbul ıüğşçö", "Straße groß", "ǅungla"]
EMOJI = ["🐱", "🚀", "👩‍💻", "🇫🇷", "👍🏽", "❤️", "🧑‍🚀", "🏳️‍🌈", "😀😃😄", "🐈‍⬛", "✨", "©", "™", "☕"]
SYMBOLS = ["!", "?", "...", "…", "—", "–", "-", "(", ")", "[", "]", "{", "}", "\"", "'", "’", "“", "”", "#", "@", "$",
           "%", "^", "&", "*", "+", "=", "/", "\\", "|", "~", "`", ":", ";", ",", ".", "<", ">", "°", "±", "∑", "√"]
CONTRACTIONS = ["don't", "it's", "we'll", "they're", "I've", "I'm", "she'd", "can't", "'s", "O'Neil", "rock'n'roll",
                "DON'T", "It'S"]
NUMBERS = ["1024", "3.14", "1,000", "2024-05-01", "4k", "x2", "50%", "½", "²", "①", "١٢٣", "Ⅻ", "007"]
COMPAT = ["ﬁne", "ＦＵＬＬ　ＷＩＤＴＨ", "ｶﾀｶﾅ", "x²", "H₂O", "™", "㎏", "Ⅸ", "ﬀ", "\u00a0nbsp", "zero\u200bwidth",
          "soft\u00adhyphen", "ctrl\u0007bell", "tab\tsep", "line\nbreak", "cr\r\nlf", "\u2028sep", "\ufeffbom"]
SPECIAL = ["<|startoftext|>", "<|endoftext|>", "</s>", "<pad>", "<unk>", "<extra_id_0>", "<extra_id_99>", "<s>",
           "<|endoftext|><|endoftext|>", "a</s>b", "x<extra_id_5>y"]
SPACES = [" ", "  ", "   ", "\t", "\n", " \t ", "\u3000", "\u2003"]


def prompt(rng):
    kind = rng.random()
    parts = []
    n = rng.choice([1, 2, 3, 5, 8, 12, 20])
    for _ in range(n):
        r = rng.random()
        if r < 0.55:
            w = rng.choice(WORDS)
            c = rng.random()
            w = w.upper() if c < 0.08 else w.capitalize() if c < 0.25 else w
            parts.append(w)
        elif r < 0.62:
            parts.append(rng.choice(ACCENTED))
        elif r < 0.68:
            parts.append(rng.choice(SCRIPTS))
        elif r < 0.73:
            parts.append(rng.choice(EMOJI))
        elif r < 0.81:
            parts.append(rng.choice(SYMBOLS))
        elif r < 0.86:
            parts.append(rng.choice(CONTRACTIONS))
        elif r < 0.91:
            parts.append(rng.choice(NUMBERS))
        elif r < 0.95:
            parts.append(rng.choice(COMPAT))
        else:
            parts.append(rng.choice(SPECIAL))
    text = ""
    for p in parts:
        sep = rng.choice(SPACES) if rng.random() < 0.12 else ("" if rng.random() < 0.1 else " ")
        text += (sep if text else "") + p
    if kind < 0.05:
        text = rng.choice(SPACES) + text
    elif kind < 0.1:
        text = text + rng.choice(SPACES)
    return text


def corpus():
    rng = random.Random(20261127)
    prompts = ["", " ", "   ", "\t\n", "a", "A cat.", "<|endoftext|>", "</s>"]
    prompts += [prompt(rng) for _ in range(2360)]
    long = " ".join(rng.choice(WORDS) for _ in range(700))  # past CLIP's 77 and T5's 512 tokens
    prompts += [long, long.upper(), ", ".join([long[:400]] * 3)]
    prompts += ["a photo of a cat" * 40, "🐱" * 200, "x" * 1000, ("café " * 150).strip(), "a" + "  " * 100 + "b"]
    prompts += [s + " " + e for s in SCRIPTS[:6] for e in EMOJI[:4]]
    return prompts


def main():
    with tempfile.TemporaryDirectory() as vocab:
        subprocess.run([sys.executable, os.path.join(HERE, "..", "text", "real_vocab.py"), vocab], check=True)
        clip = CLIPTokenizer.from_pretrained(os.path.join(vocab, "clip"))
        t5 = T5TokenizerFast.from_pretrained(os.path.join(vocab, "t5"))
        prompts = corpus()
        rows = []
        for p in prompts:
            rows.append({"text": p, "clip": clip(p)["input_ids"], "t5": t5(p)["input_ids"]})
        # What FluxPipeline gives the encoders (padded, truncated) for a few prompts.
        flux = []
        for p in prompts[:50] + prompts[-30:]:
            flux.append({"text": p,
                         "clip": clip(p, padding="max_length", max_length=77, truncation=True)["input_ids"],
                         "t5_512": t5(p, padding="max_length", max_length=512, truncation=True)["input_ids"],
                         "t5_256": t5(p, padding="max_length", max_length=256, truncation=True)["input_ids"]})
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump({"source": "transformers CLIPTokenizer / T5TokenizerFast on the vocabularies of tests/text/real_vocab.py",
                   "prompts": rows, "flux": flux}, f, ensure_ascii=False, separators=(",", ":"))
    print(f"wrote {len(rows)} prompts to {os.path.abspath(OUT)}")


if __name__ == "__main__":
    main()
