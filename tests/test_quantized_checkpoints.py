"""Checkpoints that ship quantized weights (FP8 with block scales, as DeepSeek-V3 and the Qwen3
FP8 releases do; MXFP4 experts, as GPT-OSS does) are dequantized into the model and the expert
store at load: the logits equal transformers' on the same weights dequantized, and a format
pregated does not read is refused by name. Packed integer formats (GPTQ, AWQ, compressed-tensors):
test_packed_checkpoints.py."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pregated.engine import Engine
from tiny_models import make_checkpoint, reference_model

PROMPT = list(range(5, 40))
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def tensors_of(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def rewrite(src, dst, tensors, quantization=None):
    """A copy of checkpoint `src` (tokenizer, config) holding `tensors` in one file."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config", None)
    if quantization:
        cfg["quantization_config"] = quantization
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(dst)


def quantize_fp8(w, block=32):
    """w [..., N, K] -> (float8_e4m3fn weights, float32 scales [..., ceil(N/b), ceil(K/b)], dequantized)."""
    N, K = w.shape[-2:]
    pad = torch.nn.functional.pad(w.float(), (0, -K % block, 0, -N % block))
    blocks = pad.unflatten(-1, (-1, block)).unflatten(-3, (-1, block))          # [.., n, b, k, b]
    scale = blocks.abs().amax(dim=(-3, -1)).clamp_min(1e-12) / 448.0            # [.., n, k]
    q = (blocks / scale[..., :, None, :, None]).flatten(-4, -3).flatten(-2, -1)[..., :N, :K].to(torch.float8_e4m3fn)
    full = scale.repeat_interleave(block, -2)[..., :N, :].repeat_interleave(block, -1)[..., :K]
    return q, scale, q.float() * full


def quantize_mxfp4(w):
    """w [E, rows, cols] with cols % 32 == 0 -> (blocks [E, rows, cols/32, 16] uint8, scales
    [E, rows, cols/32] uint8, dequantized [E, rows, cols])."""
    g = w.float().unflatten(-1, (-1, 32))                                        # [E, rows, G, 32]
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-127, 127)
    idx = ((g / torch.exp2(exp)[..., None])[..., None] - FP4).abs().argmin(-1)   # nearest FP4 value
    blocks = (idx[..., 0::2] | (idx[..., 1::2] << 4)).to(torch.uint8)
    deq = FP4[idx] * torch.exp2(exp)[..., None]
    return blocks, (exp + 127).to(torch.uint8), deq.flatten(-2)


def assert_same_logits(quantized, dequantized):
    with torch.no_grad():
        want = reference_model(dequantized)(torch.tensor([PROMPT])).logits[0].float()
    with Engine(quantized, device="cpu", dtype="float32", quiet=True) as eng:
        got = eng.logits(PROMPT)
        assert ((got - want).norm(dim=-1) / want.norm(dim=-1)).max() < 1e-4
        eng.runtime.check()


def test_fp8_block_scaled_checkpoint(checkpoint_factory, tmp_path):
    src = checkpoint_factory("deepseek_v3", fused=True)
    quant, deq = {}, {}
    for name, t in tensors_of(src).items():
        if t.dim() >= 2 and ("proj" in name or "experts" in name):  # linear and expert weights
            q, s, d = quantize_fp8(t)
            quant[name], quant[name + "_scale_inv"], deq[name] = q, s, d
        else:
            quant[name] = deq[name] = t.float()
    qcfg = {"quant_method": "fp8", "weight_block_size": [32, 32], "fmt": "e4m3", "activation_scheme": "dynamic"}
    assert any(v.dtype == torch.float8_e4m3fn for v in quant.values())
    assert_same_logits(rewrite(src, tmp_path / "fp8", quant, qcfg), rewrite(src, tmp_path / "deq", deq))


def test_mxfp4_expert_checkpoint(checkpoint_factory, tmp_path):
    src = checkpoint_factory("gpt_oss", fused=True, intermediate_size=64)
    quant, deq = {}, {}
    for name, t in tensors_of(src).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out]: groups along in
            blocks, scales, d = quantize_mxfp4(t.transpose(1, 2))
            quant[name + "_blocks"], quant[name + "_scales"] = blocks, scales
            deq[name] = d.transpose(1, 2)
        else:
            quant[name] = deq[name] = t.float()
    qcfg = {"quant_method": "mxfp4", "modules_to_not_convert": []}
    assert_same_logits(rewrite(src, tmp_path / "mxfp4", quant, qcfg), rewrite(src, tmp_path / "deq", deq))


def test_other_quantized_formats_are_refused(mixtral_folder, tmp_path):
    folder = rewrite(mixtral_folder, tmp_path / "bnb", tensors_of(mixtral_folder),
                     {"quant_method": "bitsandbytes", "load_in_4bit": True})
    with pytest.raises(ValueError, match=r"ships weights quantized with 'bitsandbytes'; pregated reads checkpoints "
                                         r"quantized with fp8, mxfp4 \(dequantized at load\), gptq, awq, compressed-tensors"):
        Engine(folder, device="cpu", quiet=True)
