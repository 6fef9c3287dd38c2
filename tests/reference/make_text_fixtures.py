#!/usr/bin/env python3
"""Builds the text-encoder fixtures and a whole tiny FLUX pipeline with diffusers and transformers.

Run by hand after make_fixtures.py and make_vae_fixtures.py (CI uses the committed output):
    launch/install.sh --reference && $PARDIT_VENV/bin/python tests/reference/make_text_fixtures.py

Writes tests/fixtures/flux_tiny_pipeline/, a folder FluxPipeline.from_pretrained loads: the tiny dev transformer
and VAE of the other fixtures, a tiny CLIPTextModel and T5EncoderModel (random, FLUX.1's structure), and
tokenizers trained here on our own text (a CLIP-format byte-level BPE; a SentencePiece unigram model, saved
as spiece.model and as tokenizer.json). And tests/fixtures/text_tiny.safetensors with
  * CLIP ids (padded to 77) and pooled outputs, T5 ids (padded) and hidden states, float32 and bfloat16,
  * FluxPipeline.encode_prompt's prompt_embeds / pooled_prompt_embeds,
  * FluxPipeline's pixels (output_type="pil") from prompt strings, with and without true CFG,
  * the ids of a slice of the tokenizer corpus through the tiny tokenizers.
"""
import collections
import json
import os
import shutil
import tempfile

import numpy as np
import copy

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel,
                          T5TokenizerFast)

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "fixtures")
OUT = os.path.join(FIX, "flux_tiny_pipeline")
TEXT = ("a photo of a cat sitting on a mat in the sun . an astronaut riding a horse on the moon , highly detailed "
        "oil painting of a castle by the sea at sunset ; cinematic lighting , 8k , ultra realistic . a cozy cabin "
        "in the snowy forest with warm light in the windows . the quick brown fox jumps over the lazy dog ! "
        "portrait of a robot reading a book in a library , soft light , bokeh . watercolor sketch of tokyo streets "
        "at night with neon signs and rain reflections . don't stop believing , it's a beautiful day ! ") * 4
PROMPTS = ["a photo of a cat", "An astronaut riding a horse on the moon, highly detailed oil painting",
           "", "Café crème — 東京 🐱 it's 8K!!", "a  cozy   cabin\tin the snow"]
MAX_LEN = 24  # T5 tokens (max_sequence_length) for the tiny pipeline


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                bound = 1.0 / np.sqrt(np.prod(p.shape[1:]))
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def byte_alphabet():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def train_clip_bpe(text, merges_wanted):
    """A byte-level BPE in CLIP's format, trained on our own text: vocab.json and merges.txt contents."""
    alphabet = byte_alphabet()
    words = collections.Counter(text.lower().split())
    seqs = {w: [alphabet[b] for b in w.encode()] for w in words}
    for w in seqs:
        seqs[w][-1] += "</w>"
    merges = []
    for _ in range(merges_wanted):
        pairs = collections.Counter()
        for w, s in seqs.items():
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        for w, s in seqs.items():
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    symbols = [alphabet[b] for b in sorted(alphabet, key=lambda b: list(alphabet).index(b))]
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_list))}
    return vocab, ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    # Tokenizers.
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = train_clip_bpe(TEXT, 300)
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("\n".join(merges) + "\n")
        clip_tok = CLIPTokenizer(vocab=os.path.join(tmp, "vocab.json"), merges=os.path.join(tmp, "merges.txt"),
                                 model_max_length=77)
        with open(os.path.join(tmp, "corpus.txt"), "w") as f:
            f.write(TEXT.replace(" . ", "\n"))
        spm.SentencePieceTrainer.train(input=os.path.join(tmp, "corpus.txt"), model_prefix=os.path.join(tmp, "spiece"),
                                       vocab_size=100, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                       normalization_rule_name="nmt_nfkc", character_coverage=1.0)
        spiece = open(os.path.join(tmp, "spiece.model"), "rb").read()
        # T5TokenizerFast as transformers converts a spiece.model: its pieces, then the 100 sentinels
        # <extra_id_99> ... <extra_id_0> (FLUX.1's T5 layout), and its precompiled normaliser.
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(spiece)
        pieces = [(p.piece, p.score) for p in proto.pieces] + [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
        t5_tok = T5TokenizerFast(vocab=pieces, _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap,
                                 extra_ids=100, model_max_length=512)
    # Encoders: FLUX.1's structure at test sizes; their widths are the tiny transformer's inputs.
    transformer = FluxTransformer2DModel.from_pretrained(os.path.join(FIX, "flux_tiny_dev", "diffusers", "transformer"))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=transformer.config.pooled_projection_dim,
                                        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2,
                                        bos_token_id=0, pad_token_id=1)).eval()
    randomize(clip, 31)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=transformer.config.joint_attention_dim, d_kv=8, d_ff=64,
                                 num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                                 relative_attention_num_buckets=32, relative_attention_max_distance=128)).eval()
    randomize(t5, 37)
    vae = AutoencoderKL.from_pretrained(os.path.join(FIX, "flux_tiny_dev", "diffusers", "vae"))
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(FIX, "flux_tiny_dev", "diffusers", "scheduler"))
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(OUT, safe_serialization=True)
    with open(os.path.join(OUT, "tokenizer_2", "spiece.model"), "wb") as f:
        f.write(spiece)
    # The transformer and the VAE are the other fixtures' (links instead of copies).
    for sub, target in (("transformer", "transformer"), ("vae", "vae")):
        shutil.rmtree(os.path.join(OUT, sub))
        os.symlink(os.path.join("..", "flux_tiny_dev", "diffusers", target), os.path.join(OUT, sub))
    reloaded = FluxPipeline.from_pretrained(OUT)  # the folder must load as a pipeline
    assert reloaded.tokenizer_max_length == 77

    out, meta = {}, {"prompts": json.dumps(PROMPTS), "max_sequence_length": str(MAX_LEN)}
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            cids = clip_tok(p, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            tids = t5_tok(p, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt").input_ids
            out[f"clip_ids.{i}"] = cids
            out[f"t5_ids.{i}"] = tids
            out[f"clip_pooled_fp32.{i}"] = clip(cids).pooler_output
            out[f"t5_hidden_fp32.{i}"] = t5(tids)[0]
            out[f"clip_pooled_bf16.{i}"] = copy.deepcopy(clip).to(torch.bfloat16)(cids).pooler_output.float()
            out[f"t5_hidden_bf16.{i}"] = copy.deepcopy(t5).to(torch.bfloat16)(tids)[0].float()
        pe, ppe, _ = pipe.encode_prompt(prompt=PROMPTS[1], prompt_2=PROMPTS[1], max_sequence_length=MAX_LEN)
        out["prompt_embeds"], out["pooled_prompt_embeds"] = pe, ppe
        for name, kw in (("plain", {}), ("true_cfg", {"negative_prompt": PROMPTS[0], "true_cfg_scale": 2.5})):
            image = pipe(prompt=PROMPTS[1], height=64, width=96, num_inference_steps=3, guidance_scale=3.5,
                         max_sequence_length=MAX_LEN, output_type="pil",
                         generator=torch.Generator("cpu").manual_seed(42), **kw).images[0]
            out[f"pixels_{name}"] = torch.from_numpy(np.asarray(image).copy())
    # The tiny tokenizers on a slice of the corpus (the spiece.model path and the tokenizer.json path).
    corpus = json.load(open(os.path.join(FIX, "tokenizer_corpus.json")))["prompts"]
    texts = [r["text"] for r in corpus[:400]]
    meta["tiny_tokenizer_ids"] = json.dumps({"texts": texts, "clip": [clip_tok(t)["input_ids"] for t in texts],
                                             "t5": [t5_tok(t)["input_ids"] for t in texts]}, ensure_ascii=False)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(FIX, "text_tiny.safetensors"), metadata=meta)
    print("wrote", os.path.abspath(OUT), "and text_tiny.safetensors")


if __name__ == "__main__":
    main()
