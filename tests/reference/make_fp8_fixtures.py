#!/usr/bin/env python3
"""Builds the reference fixtures of pardit's FP8 tests with torch and diffusers from PyPI.

Run by hand after make_fixtures.py (CI uses the committed output):
    launch/install.sh --reference && $PARDIT_VENV/bin/python tests/reference/make_fp8_fixtures.py

The quantization rule of pardit's FP8 weights, written here with torch: for each linear weight inside the
transformer blocks, one float32 scale per output row, scale = max|w[o, :]| / 448 (1 for an all-zero row),
values = (w / scale).clamp(-448, 448) cast to float8_e4m3fn.

Writes
  * fp8_reference.safetensors:
      - quant.<n>.{weight,values,scale}: weights (a block weight of the tiny dev model, and a matrix with a
        zero row, a row of subnormal-range values and rows of mixed magnitude) and torch's quantization,
      - rowwise_fp32 / rowwise_bf16: FluxTransformer2DModel (tiny dev) on forward_tiny_dev's inputs with its
        block weights replaced by the dequantized FP8 rows (values * scale), in float32 and bfloat16,
      - plain_fp32 / scaled_fp32: the tiny schnell model with the weights of the two single files below,
        dequantized as their conventions say, on forward_tiny_schnell's inputs,
  * fp8_conventions/: the tiny schnell BFL file in the two conventions of FP8 single files users have:
      - flux1-tiny-schnell-fp8.safetensors: every 2-D weight cast to float8_e4m3fn (no scales),
      - flux1-tiny-schnell-fp8-scaled.safetensors: ComfyUI's "scaled fp8": every 2-D weight divided by one
        float32 scale per tensor (<layer>.scale_weight, max|w| / 448) and cast, with the "scaled_fp8"
        marker tensor and <layer>.scale_input (1.0).
"""
import os
import sys

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import MODELS, to_bfl  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_rows(w):
    w = w.float()
    amax = w.abs().amax(1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    values = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return values, scale


def block_linear(name, t):
    return name.startswith(("transformer_blocks.", "single_transformer_blocks.")) and name.endswith(".weight") \
        and t.dim() == 2


def from_bfl(bfl, template, cfg):
    """BFL tensors -> the diffusers state dict `template` describes: each diffusers element is traced through
    to_bfl by its index, so every split, fusion and reordering is undone exactly."""
    ids, offset = {}, 0
    for k, v in template.items():
        ids[k] = torch.arange(offset, offset + v.numel(), dtype=torch.float64).reshape(v.shape)
        offset += v.numel()
    flat = torch.empty(offset, dtype=torch.float32)
    for k, v in to_bfl(ids, cfg).items():
        flat[v.reshape(-1).long()] = bfl[k].float().reshape(-1)
    return {k: flat[ids[k].reshape(-1).long()].reshape(v.shape).clone() for k, v in template.items()}


def forward(model, inputs, dtype=torch.float32):
    m = model.to(dtype)
    args = {k: (v.to(dtype) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v)
            for k, v in inputs.items() if k not in ("sample", "sample_bf16")}
    with torch.no_grad():
        return m(**args, return_dict=False)[0].float()


def main():
    torch.set_num_threads(1)
    out = {}
    # The quantizer on a real block weight and on a matrix with the edge cases.
    dev = FluxTransformer2DModel.from_pretrained(os.path.join(OUT, "flux_tiny_dev", "diffusers", "transformer")).eval()
    sd = dev.state_dict()
    g = torch.Generator().manual_seed(8)
    edge = torch.randn(6, 40, generator=g)
    edge[1] = 0.0                                  # an all-zero row: scale 1
    edge[2] = torch.randn(40, generator=g) * 1e-30  # values far below float32's normal range of the others
    edge[3, :20] *= 1e-4                           # mixed magnitudes: the small ones land in e4m3's subnormals
    edge[4] = -edge[4].abs()                       # the row maximum is negative
    for i, w in enumerate([sd["transformer_blocks.0.attn.to_q.weight"], edge]):
        values, scale = quantize_rows(w)
        out[f"quant.{i}.weight"], out[f"quant.{i}.values"], out[f"quant.{i}.scale"] = w.float(), values, scale
    # The tiny dev model with FP8 rows for its block weights.
    deq = {k: (lambda q: q[0].float() * q[1][:, None])(quantize_rows(v)) if block_linear(k, v) else v
           for k, v in sd.items()}
    dev.load_state_dict(deq)
    inputs = load_file(os.path.join(OUT, "forward_tiny_dev.safetensors"))
    out["rowwise_fp32"] = forward(dev, inputs)
    out["rowwise_bf16"] = forward(dev, inputs, torch.bfloat16)
    # The tiny schnell model as the two kinds of FP8 single files.
    cfg = MODELS["tiny_schnell"]
    schnell = FluxTransformer2DModel.from_pretrained(
        os.path.join(OUT, "flux_tiny_schnell", "diffusers", "transformer")).eval()
    template = schnell.state_dict()
    bfl = to_bfl(template, cfg)
    inputs = load_file(os.path.join(OUT, "forward_tiny_schnell.safetensors"))
    cdir = os.path.join(OUT, "fp8_conventions")
    os.makedirs(cdir, exist_ok=True)
    meta = {"format": "pt", "axes_dims_rope": ",".join(str(a) for a in cfg["axes_dims_rope"])}
    plain, plain_deq = {}, {}
    scaled, scaled_deq = {"scaled_fp8": torch.empty(0, dtype=FP8)}, {}
    for k, v in bfl.items():
        if k.endswith(".weight") and v.dim() == 2:
            plain[k] = v.to(FP8)
            plain_deq[k] = plain[k].float()
            s = v.abs().max().float() / FP8_MAX
            scaled[k] = (v / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            scaled[k[:-len("weight")] + "scale_weight"] = s.reshape(())
            scaled[k[:-len("weight")] + "scale_input"] = torch.tensor(1.0)
            scaled_deq[k] = scaled[k].float() * s
        else:
            plain[k] = plain_deq[k] = scaled[k] = scaled_deq[k] = v
    save_file(plain, os.path.join(cdir, "flux1-tiny-schnell-fp8.safetensors"), metadata=meta)
    save_file(scaled, os.path.join(cdir, "flux1-tiny-schnell-fp8-scaled.safetensors"), metadata=meta)
    for name, weights in (("plain", plain_deq), ("scaled", scaled_deq)):
        schnell.load_state_dict(from_bfl(weights, template, cfg))
        out[f"{name}_fp32"] = forward(schnell, inputs)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, "fp8_reference.safetensors"))
    print("FP8 fixtures written to", os.path.abspath(OUT))


if __name__ == "__main__":
    sys.exit(main())
