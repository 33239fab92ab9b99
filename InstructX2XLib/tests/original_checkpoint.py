"""Write a diffusers InstructPix2Pix pipeline as an original (LDM) single-file checkpoint.

The released instruct-pix2pix-00-22000.ckpt uses CompVis key names; no such file of a tiny
model exists, so the tests make one. This inverts the key renaming that diffusers'
single-file loader applies; ``test_loading`` checks the inversion by a bit-exact round trip.
"""

from __future__ import annotations

import re

import torch

_RESNET_UNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_key(key: str, layers: int, up_has_attention: list[bool]) -> str:
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    for new, old in fixed.items():
        if key.startswith(new + "."):
            return old + key[len(new) :]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * (layers + 1) + layer
        return f"input_blocks.{index}.{0 if kind == 'resnets' else 1}.{_resnet(rest, kind)}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        index = 1 if m[1] == "attentions" else 2 * int(m[2])
        return f"middle_block.{index}.{_resnet(m[3], m[1])}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        index = int(m[1]) * (layers + 1) + int(m[3])
        return f"output_blocks.{index}.{0 if m[2] == 'resnets' else 1}.{_resnet(m[4], m[2])}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        block = int(m[1])
        position = 2 if up_has_attention[block] else 1
        return f"output_blocks.{block * (layers + 1) + layers}.{position}.conv.{m[2]}"
    raise KeyError(key)


def _resnet(rest: str, kind: str) -> str:
    if kind != "resnets":
        return rest
    name, _, tail = rest.partition(".")
    return f"{_RESNET_UNET[name]}.{tail}"


def _vae_key(key: str, blocks: int) -> str:
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*?)\.(weight|bias)$", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    return key


def original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """Flat CompVis-style state dict of the pipeline's UNet, VAE and text encoder."""
    unet_config = pipe.unet.config
    up_has_attention = ["CrossAttn" in name for name in unet_config.up_block_types]
    state = {}
    for key, value in pipe.unet.state_dict().items():
        state["model.diffusion_model." + _unet_key(key, unet_config.layers_per_block, up_has_attention)] = (
            value
        )
    blocks = len(pipe.vae.config.block_out_channels)
    for key, value in pipe.vae.state_dict().items():
        new = _vae_key(key, blocks)
        if ".attn_1." in new and new.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM attention projections are 1x1 convolutions
        state["first_stage_model." + new] = value
    for key, value in pipe.text_encoder.state_dict().items():
        # transformers 5 drops the "text_model." level that CLIP checkpoints carry
        key = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + key] = value
    return {k: v.contiguous() for k, v in state.items()}
