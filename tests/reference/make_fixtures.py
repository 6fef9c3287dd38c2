#!/usr/bin/env python3
"""Builds the reference fixtures for pardit's fidelity tests with diffusers from PyPI.

Run by hand (CI uses the committed output):
    launch/install.sh --reference && $PARDIT_VENV/bin/python tests/reference/make_fixtures.py

For two tiny FLUX transformers (one with guidance embeddings like FLUX.1-dev, one without like
schnell) it writes
  * the checkpoint in the diffusers layout (save_pretrained; the schnell-like one sharded with an index)
    and in the BFL single-file layout (names converted by this script),
  * forward fixtures: FluxTransformer2DModel inputs (batch 2, non-square 48x80 px image) and outputs,
    in float32 and bfloat16,
  * generate fixtures: FluxPipeline runs (prompt embeddings and initial latents given,
    output_type="latent") with distilled guidance (dev-like) and with true CFG (schnell-like),
  * the scheduler's sigmas for several step counts and image sizes.
"""
import copy
import json
import os
import shutil
import sys

import numpy as np
import torch
import diffusers
from diffusers import FluxPipeline, FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")

MODELS = {
    "tiny_dev": dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                     num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
                     guidance_embeds=True, axes_dims_rope=(4, 4, 8)),
    "tiny_schnell": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16,
                         guidance_embeds=False, axes_dims_rope=(4, 4, 8)),
}
DEV_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                     num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
SCHNELL_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                         num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
HEIGHT, WIDTH = 48, 80  # 3 x 5 packed tokens: non-square
BATCH = 2
TEXT_LEN = 7


def randomize(model, seed):
    """Replaces every parameter (norm scales included) with seeded random values of a sane scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                bound = 1.0 / np.sqrt(p.shape[1])
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
            elif name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def to_bfl(sd, cfg):
    """diffusers FluxTransformer2DModel state dict -> BFL single-file names (fused qkv / linear1)."""
    out = {}
    h = cfg["attention_head_dim"] * cfg["num_attention_heads"]
    rename = {
        "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    }
    for src, dst in rename.items():
        for leaf in ("weight", "bias"):
            if f"{src}.{leaf}" in sd:
                out[f"{dst}.{leaf}"] = sd[f"{src}.{leaf}"]
    for leaf in ("weight", "bias"):
        w = sd[f"norm_out.linear.{leaf}"]  # diffusers: scale | shift; BFL: shift | scale
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([w[h:], w[:h]], 0)
    for i in range(cfg["num_layers"]):
        s, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[d + f"img_mod.lin.{leaf}"] = sd[s + f"norm1.linear.{leaf}"]
            out[d + f"txt_mod.lin.{leaf}"] = sd[s + f"norm1_context.linear.{leaf}"]
            out[d + f"img_attn.qkv.{leaf}"] = torch.cat([sd[s + f"attn.to_{x}.{leaf}"] for x in "qkv"], 0)
            out[d + f"txt_attn.qkv.{leaf}"] = torch.cat([sd[s + f"attn.add_{x}_proj.{leaf}"] for x in "qkv"], 0)
            out[d + f"img_attn.proj.{leaf}"] = sd[s + f"attn.to_out.0.{leaf}"]
            out[d + f"txt_attn.proj.{leaf}"] = sd[s + f"attn.to_add_out.{leaf}"]
            out[d + f"img_mlp.0.{leaf}"] = sd[s + f"ff.net.0.proj.{leaf}"]
            out[d + f"img_mlp.2.{leaf}"] = sd[s + f"ff.net.2.{leaf}"]
            out[d + f"txt_mlp.0.{leaf}"] = sd[s + f"ff_context.net.0.proj.{leaf}"]
            out[d + f"txt_mlp.2.{leaf}"] = sd[s + f"ff_context.net.2.{leaf}"]
        out[d + "img_attn.norm.query_norm.scale"] = sd[s + "attn.norm_q.weight"]
        out[d + "img_attn.norm.key_norm.scale"] = sd[s + "attn.norm_k.weight"]
        out[d + "txt_attn.norm.query_norm.scale"] = sd[s + "attn.norm_added_q.weight"]
        out[d + "txt_attn.norm.key_norm.scale"] = sd[s + "attn.norm_added_k.weight"]
    for i in range(cfg["num_single_layers"]):
        s, d = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[d + f"modulation.lin.{leaf}"] = sd[s + f"norm.linear.{leaf}"]
            out[d + f"linear1.{leaf}"] = torch.cat(
                [sd[s + f"attn.to_{x}.{leaf}"] for x in "qkv"] + [sd[s + f"proj_mlp.{leaf}"]], 0)
            out[d + f"linear2.{leaf}"] = sd[s + f"proj_out.{leaf}"]
        out[d + "norm.query_norm.scale"] = sd[s + "attn.norm_q.weight"]
        out[d + "norm.key_norm.scale"] = sd[s + "attn.norm_k.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def image_ids():
    return FluxPipeline._prepare_latent_image_ids(BATCH, HEIGHT // 16, WIDTH // 16, "cpu", torch.float32)


def forward_fixture(name, model, cfg, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = (HEIGHT // 16) * (WIDTH // 16)
    inputs = {
        "hidden_states": torch.randn(BATCH, tokens, cfg["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(BATCH, TEXT_LEN, cfg["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(BATCH, cfg["pooled_projection_dim"], generator=g),
        "timestep": torch.tensor([0.3, 0.85]),
        "img_ids": image_ids(),
        "txt_ids": torch.zeros(TEXT_LEN, 3),
    }
    if cfg["guidance_embeds"]:
        inputs["guidance"] = torch.tensor([3.5, 2.0])
    tensors = dict(inputs)
    with torch.no_grad():
        tensors["sample"] = model(**inputs, return_dict=False)[0]
        bf = copy.deepcopy(model).to(torch.bfloat16)  # keep the fp32 model intact
        binputs = {k: (v.to(torch.bfloat16) if k in ("hidden_states", "encoder_hidden_states",
                                                      "pooled_projections") else v) for k, v in inputs.items()}
        tensors["sample_bf16"] = bf(**binputs, return_dict=False)[0]
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, f"forward_{name}.safetensors"))


def generate_fixture(name, model, cfg, sched_cfg, seed, true_cfg, steps=3, guidance=3.5):
    scheduler = FlowMatchEulerDiscreteScheduler(**sched_cfg)
    pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randn(BATCH, TEXT_LEN, cfg["joint_attention_dim"], generator=g)
    pooled = torch.randn(BATCH, cfg["pooled_projection_dim"], generator=g)
    neg = torch.randn(BATCH, TEXT_LEN, cfg["joint_attention_dim"], generator=g)
    neg_pooled = torch.randn(BATCH, cfg["pooled_projection_dim"], generator=g)
    # The initial latents exactly as the pipeline makes them from a seeded CPU generator.
    noise = torch.randn(BATCH, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator("cpu").manual_seed(seed),
                        dtype=torch.float32)
    latents = FluxPipeline._pack_latents(noise, BATCH, 16, HEIGHT // 8, WIDTH // 8)
    kwargs = dict(prompt_embeds=prompt, pooled_prompt_embeds=pooled, latents=latents.clone(), height=HEIGHT,
                  width=WIDTH, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                  return_dict=False)
    if true_cfg:
        kwargs.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled, true_cfg_scale=true_cfg)
    with torch.no_grad():
        out = pipe(**kwargs)[0]
    tensors = {"latents_in": latents, "prompt_embeds": prompt, "pooled_prompt_embeds": pooled, "latents": out,
               "sigmas": scheduler.sigmas.to(torch.float32)}
    if true_cfg:
        tensors.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
    meta = {"seed": str(seed), "steps": str(steps), "guidance_scale": str(guidance), "height": str(HEIGHT),
            "width": str(WIDTH), "true_cfg_scale": str(true_cfg or 1.0)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, f"generate_{name}.safetensors"),
              metadata=meta)


def schedule_fixture():
    cases = []
    for sched_name, sc in (("dev", DEV_SCHEDULER), ("schnell", SCHNELL_SCHEDULER)):
        for steps in (1, 2, 4, 28, 50):
            for seq in (16, 256, 1024, 4096, 6144):
                s = FlowMatchEulerDiscreteScheduler(**sc)
                sig = np.linspace(1.0, 1 / steps, steps)
                mu = diffusers.pipelines.flux.pipeline_flux.calculate_shift(seq, 256, 4096, 0.5, 1.15)
                s.set_timesteps(sigmas=sig, mu=mu)
                cases.append({"scheduler": sched_name, "steps": steps, "image_seq_len": seq,
                              "sigmas_f32_bits": [int(x) for x in s.sigmas.numpy().view(np.uint32)],
                              "timesteps_f32_bits": [int(x) for x in s.timesteps.numpy().view(np.uint32)]})
    with open(os.path.join(OUT, "schedules.json"), "w") as f:
        json.dump({"cases": cases}, f, indent=0)


def main():
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    for seed, (name, cfg) in enumerate(MODELS.items()):
        mdir = os.path.join(OUT, f"flux_{name}")
        shutil.rmtree(mdir, ignore_errors=True)
        model = FluxTransformer2DModel(**cfg).eval()
        randomize(model, 1000 + seed)
        # diffusers layout: the dev-like model as one file, the schnell-like one sharded with an index.
        shard = "10GB" if cfg["guidance_embeds"] else "40KB"
        model.save_pretrained(os.path.join(mdir, "diffusers", "transformer"), max_shard_size=shard)
        sched = DEV_SCHEDULER if cfg["guidance_embeds"] else SCHNELL_SCHEDULER
        os.makedirs(os.path.join(mdir, "diffusers", "scheduler"))
        with open(os.path.join(mdir, "diffusers", "scheduler", "scheduler_config.json"), "w") as f:
            json.dump({"_class_name": "FlowMatchEulerDiscreteScheduler", **sched}, f, indent=2)
        axes = ",".join(str(a) for a in cfg["axes_dims_rope"])
        save_file(to_bfl(model.state_dict(), cfg), os.path.join(mdir, f"flux1-{name.replace('_', '-')}.safetensors"),
                  metadata={"format": "pt", "axes_dims_rope": axes})
        forward_fixture(name, model, cfg, 2000 + seed)
        if cfg["guidance_embeds"]:
            generate_fixture(name, model, cfg, DEV_SCHEDULER, 42, true_cfg=None)
        else:
            generate_fixture(name + "_cfg", model, cfg, SCHNELL_SCHEDULER, 7, true_cfg=2.5, steps=4)
    schedule_fixture()
    with open(os.path.join(OUT, "VERSIONS"), "w") as f:
        f.write(f"torch {torch.__version__}\ndiffusers {diffusers.__version__}\nnumpy {np.__version__}\n")
    print("fixtures written to", os.path.abspath(OUT))


if __name__ == "__main__":
    sys.exit(main())
