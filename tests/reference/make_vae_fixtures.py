#!/usr/bin/env python3
"""Builds the reference fixtures of pardit's VAE and image-output tests with diffusers from PyPI.

Run by hand after make_fixtures.py (CI uses the committed output):
    launch/install.sh --reference && $PARDIT_VENV/bin/python tests/reference/make_vae_fixtures.py

Writes
  * a tiny AutoencoderKL with FLUX.1's structure (16 latent channels, 4 levels: 8x upsampling, mid-block
    attention; narrow channels) into flux_tiny_dev/diffusers/vae (save_pretrained) and, with BFL names,
    into flux_tiny_dev/ae.safetensors (decoder tensors; the configuration shapes cannot tell in __metadata__),
  * vae_decode_tiny.safetensors: packed latents as FluxPipeline returns them, the denormalised latents,
    AutoencoderKL.decode in float32 and bfloat16, with tiling enabled (two tile sizes), and
    VaeImageProcessor.postprocess's uint8 pixels,
  * pipeline_tiny_dev_image.safetensors: a whole FluxPipeline run (the tiny dev transformer + this VAE,
    prompt embeddings and seed given, output_type="pil") and its pixels.
"""
import json
import os

import numpy as np
import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           layers_per_block=1, norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159,
           use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
DEV_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                     num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def randomize(model, seed):
    """Seeded random parameters of a sane scale: uniform +-1/sqrt(fan_in) for weights, norm scales near 1."""
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


def to_bfl_decoder(sd, levels):
    """diffusers decoder names -> BFL ae.safetensors names (attention projections as 1x1 convolutions)."""
    out = {}
    for name, t in sd.items():
        if not name.startswith("decoder."):
            continue
        n = name.replace("conv_shortcut", "nin_shortcut")
        n = n.replace("decoder.conv_norm_out.", "decoder.norm_out.")
        n = n.replace("decoder.mid_block.resnets.0.", "decoder.mid.block_1.")
        n = n.replace("decoder.mid_block.resnets.1.", "decoder.mid.block_2.")
        for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            n = n.replace(f"decoder.mid_block.attentions.0.{a}.", f"decoder.mid.attn_1.{b}.")
        if n.startswith("decoder.up_blocks."):
            parts = n.split(".")
            level = levels - 1 - int(parts[2])
            if parts[3] == "resnets":
                n = f"decoder.up.{level}.block.{parts[4]}." + ".".join(parts[5:])
            else:  # upsamplers.0.conv.*
                n = f"decoder.up.{level}.upsample." + ".".join(parts[5:])
        if "mid.attn_1." in n and n.endswith("weight") and t.dim() == 2:
            t = t[:, :, None, None]
        out[n] = t.contiguous()
    return out


def main():
    torch.set_num_threads(1)  # the tests run one intra-op thread; GEMM blockings depend on the thread count
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE).eval()
    randomize(vae, 11)
    root = os.path.join(OUT, "flux_tiny_dev")
    vae.save_pretrained(os.path.join(root, "diffusers", "vae"), safe_serialization=True)
    save_file(to_bfl_decoder(vae.state_dict(), len(VAE["block_out_channels"])), os.path.join(root, "ae.safetensors"),
              metadata={"format": "pt", "norm_num_groups": str(VAE["norm_num_groups"]),
                        "scaling_factor": str(VAE["scaling_factor"]), "shift_factor": str(VAE["shift_factor"])})

    # Decode: batch 2, 64 x 96 px (8 x 12 latent pixels), from packed latents as FluxPipeline holds them.
    height, width, batch = 64, 96, 2
    g = torch.Generator().manual_seed(5)
    packed = torch.randn(batch, (height // 16) * (width // 16), 64, generator=g)
    proc = FluxPipeline(scheduler=None, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=None)
    latents = proc._unpack_latents(packed, height, width, proc.vae_scale_factor)
    z = latents / vae.config.scaling_factor + vae.config.shift_factor
    out = {"packed_latents": packed, "z": z}
    with torch.no_grad():
        decoded = vae.decode(z, return_dict=False)[0]
        out["decoded_fp32"] = decoded
        out["pixels"] = torch.from_numpy(np.stack([np.asarray(im) for im in
                                                   proc.image_processor.postprocess(decoded, output_type="pil")]))
        vae_bf16 = AutoencoderKL(**VAE).eval()
        vae_bf16.load_state_dict(vae.state_dict())
        vae_bf16 = vae_bf16.to(torch.bfloat16)
        out["decoded_bf16"] = vae_bf16.decode(z.to(torch.bfloat16), return_dict=False)[0]
        # Tiled decode (enable_tiling): sample_size 32 gives 4 x 4 latent tiles every 3 latent pixels,
        # blended over 8 px; then 8 x 8 tiles (64 px) every 6, blended over 16 px.
        for model, suffix in ((vae, "fp32"), (vae_bf16, "bf16")):
            model.enable_tiling()
            out[f"decoded_tiled_{suffix}"] = model.decode(z.to(model.dtype), return_dict=False)[0]
        vae.tile_latent_min_size, vae.tile_sample_min_size = 8, 64
        out["decoded_tiled8_fp32"] = vae.decode(z, return_dict=False)[0]
        vae.tile_latent_min_size, vae.tile_sample_min_size = 4, 32
        vae.disable_tiling()
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, "vae_decode_tiny.safetensors"),
              metadata={"height": str(height), "width": str(width)})

    # A whole pipeline run: the tiny dev transformer of make_fixtures.py and this VAE.
    transformer = FluxTransformer2DModel.from_pretrained(os.path.join(root, "diffusers", "transformer"))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER), vae=vae, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(21)
    prompt = torch.randn(1, 7, transformer.config.joint_attention_dim, generator=g)
    pooled = torch.randn(1, transformer.config.pooled_projection_dim, generator=g)
    steps, guidance, seed = 3, 3.5, 42
    with torch.no_grad():
        images = pipe(prompt_embeds=prompt, pooled_prompt_embeds=pooled, height=height, width=width,
                      num_inference_steps=steps, guidance_scale=guidance, output_type="pil",
                      generator=torch.Generator("cpu").manual_seed(seed)).images
    save_file({"prompt_embeds": prompt, "pooled_prompt_embeds": pooled,
               "pixels": torch.from_numpy(np.stack([np.asarray(im) for im in images])).contiguous()},
              os.path.join(OUT, "pipeline_tiny_dev_image.safetensors"),
              metadata={"height": str(height), "width": str(width), "steps": str(steps),
                        "guidance_scale": str(guidance), "seed": str(seed)})
    print("wrote the VAE fixtures to", os.path.abspath(OUT))


if __name__ == "__main__":
    main()
