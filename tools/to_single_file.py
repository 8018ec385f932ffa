"""Write a diffusers-format SD1/SD2/SDXL checkpoint as one ``.safetensors`` file in the original (LDM/SGM) layout,
as community fine-tunes ship: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and
``cond_stage_model.transformer.text_model.*`` (SD1's CLIP) or ``cond_stage_model.model.*`` (SD2's OpenCLIP,
q/k/v packed into ``in_proj``); SDXL's ``conditioner.embedders.0.transformer.*`` (CLIP) and
``conditioner.embedders.1.model.*`` (OpenCLIP, with its ``text_projection`` matrix). The key tables are those of diffusers' scripts/convert_diffusers_to_original_
stable_diffusion.py, generalised to any number of blocks and layers per block, so the tiny test models convert.

    python -m tools.to_single_file MODEL_DIR OUT.safetensors [--no-vae] [--vae-out VAE.safetensors] [--v-pred-key]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
          ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
UNET_TOP = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
            ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
            ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")]


def _load(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def unet_to_ldm(sd: dict, config: dict) -> dict:
    """diffusers UNet2DConditionModel state dict -> LDM UNetModel keys (without the model.diffusion_model prefix)."""
    L = config["layers_per_block"]
    n = len(config["block_out_channels"])
    prefixes = list(UNET_TOP)
    for i in range(n):
        for j in range(L):
            prefixes.append((f"input_blocks.{(L + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            prefixes.append((f"input_blocks.{(L + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            prefixes.append((f"input_blocks.{(L + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        up_attn = "CrossAttn" in config["up_block_types"][i]
        for j in range(L + 1):
            prefixes.append((f"output_blocks.{(L + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            prefixes.append((f"output_blocks.{(L + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            prefixes.append((f"output_blocks.{(L + 1) * i + L}.{2 if up_attn else 1}.", f"up_blocks.{i}.upsamplers.0."))
    prefixes += [("middle_block.1.", "mid_block.attentions.0."), ("middle_block.0.", "mid_block.resnets.0."),
                 ("middle_block.2.", "mid_block.resnets.1.")]
    out = {}
    for key, value in sd.items():
        new = key
        for ldm, hf in prefixes:
            if key.startswith(hf):
                new = ldm + key[len(hf):]
                if ".resnets." in hf or "middle_block.0" in ldm or "middle_block.2" in ldm:
                    for a, b in RESNET:
                        new = new.replace(f".{b}.", f".{a}.")
                break
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out[new] = value
    return out


def vae_to_ldm(sd: dict, config: dict) -> dict:
    """diffusers AutoencoderKL state dict -> LDM AutoencoderKL keys (without first_stage_model.)."""
    n = len(config["block_out_channels"])
    L = config["layers_per_block"]
    prefixes = [("encoder.mid.attn_1.", "encoder.mid_block.attentions.0."),
                ("decoder.mid.attn_1.", "decoder.mid_block.attentions.0.")]
    for part in ("encoder", "decoder"):
        prefixes += [(f"{part}.mid.block_{i + 1}.", f"{part}.mid_block.resnets.{i}.") for i in range(2)]
        prefixes.append((f"{part}.norm_out.", f"{part}.conv_norm_out."))
    for i in range(n):
        for j in range(L):
            prefixes.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        for j in range(L + 1):
            prefixes.append((f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
        if i < n - 1:
            prefixes.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."))
            prefixes.append((f"decoder.up.{n - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out = {}
    for key, value in sd.items():
        new = key
        for ldm, hf in prefixes:
            if key.startswith(hf):
                new = ldm + key[len(hf):].replace("conv_shortcut", "nin_shortcut")
                if "attn_1" in ldm:
                    for a, b in attn:
                        if key[len(hf):].startswith(b):
                            new = ldm + a + key[len(hf) + len(b):]
                    if new.endswith(".weight") and value.ndim == 2:  # LDM's attention is 1x1 convolutions
                        value = value[:, :, None, None]
                break
        out[new] = value
    return out


def clip_to_ldm(sd: dict) -> dict:
    """SD1: transformers' CLIPTextModel keys under cond_stage_model.transformer.text_model."""
    return {"text_model." + (k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in sd.items()}


def open_clip_to_ldm(sd: dict) -> dict:
    """SD2: transformers' CLIPTextModel -> OpenCLIP keys (under cond_stage_model.model.), q/k/v as in_proj."""
    import torch

    sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in sd.items()}
    out = {"token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": sd.pop("final_layer_norm.weight"), "ln_final.bias": sd.pop("final_layer_norm.bias")}
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    names = [("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
             ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]
    for i in layers:
        p = f"encoder.layers.{i}."
        q = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[q + f"attn.in_proj_{kind}"] = torch.cat([sd.pop(p + f"self_attn.{x}_proj.{kind}") for x in "qkv"])
            for hf, oc in names:
                out[q + oc + kind] = sd.pop(p + hf + kind)
    sd.pop("embeddings.position_ids", None)
    if sd:
        raise KeyError(f"no OpenCLIP name for {sorted(sd)[:4]}")
    return out


def to_single_file(model_dir: str | Path, out: str | Path, vae: bool = True, vae_out: str | Path | None = None,
                   v_pred_key: bool = False) -> Path:
    """Write ``model_dir`` (diffusers layout) as one LDM-layout ``.safetensors``; the VAE optionally apart."""
    from safetensors.torch import save_file

    model_dir, out = Path(model_dir), Path(out)
    unet_cfg = json.loads((model_dir / "unet" / "config.json").read_text())
    vae_cfg = json.loads((model_dir / "vae" / "config.json").read_text())
    text_cfg = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    tensors = {f"model.diffusion_model.{k}": v for k, v in unet_to_ldm(_load(model_dir / "unet"), unet_cfg).items()}
    first_stage = {f"first_stage_model.{k}": v for k, v in vae_to_ldm(_load(model_dir / "vae"), vae_cfg).items()}
    if vae:
        tensors.update(first_stage)
    if vae_out is not None:
        save_file({k: v.contiguous() for k, v in first_stage.items()}, str(vae_out))
    text = _load(model_dir / "text_encoder")
    if (model_dir / "text_encoder_2").is_dir():  # SDXL: CLIP ViT-L and OpenCLIP ViT-bigG with its projection
        tensors.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in clip_to_ldm(text).items()})
        text2 = _load(model_dir / "text_encoder_2")
        projection = text2.pop("text_projection.weight")
        tensors.update({f"conditioner.embedders.1.model.{k}": v for k, v in open_clip_to_ldm(text2).items()})
        tensors["conditioner.embedders.1.model.text_projection"] = projection.T  # OpenCLIP: x @ text_projection
    elif text_cfg.get("hidden_act") == "gelu":  # SD2's OpenCLIP ViT-H
        tensors.update({f"cond_stage_model.model.{k}": v for k, v in open_clip_to_ldm(text).items()})
    else:
        tensors.update({f"cond_stage_model.transformer.{k}": v for k, v in clip_to_ldm(text).items()})
    if v_pred_key:  # what ComfyUI writes into v-prediction checkpoints
        import torch

        tensors["v_pred"] = torch.tensor([])
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out))
    return out


def controlnet_to_ldm(sd: dict, config: dict) -> dict:
    """diffusers ControlNetModel state dict -> the original ControlNet's keys (without ``control_model.``):
    the UNet encoder's LDM names, ``input_hint_block.{0,2,...}`` (the conditioning embedding's convolutions),
    ``zero_convs.N.0`` and ``middle_block_out.0``."""
    hint = [k for k in sd if k.startswith("controlnet_cond_embedding.blocks.")]
    blocks = len({k.split(".")[2] for k in hint})
    out, unet = {}, {}
    for key, value in sd.items():
        if key.startswith("controlnet_cond_embedding."):
            rest = key[len("controlnet_cond_embedding."):]
            part, _, tail = rest.partition(".")
            if part == "blocks":
                index, _, tail = tail.partition(".")
                out[f"input_hint_block.{2 * int(index) + 2}.{tail}"] = value
            else:
                out[f"input_hint_block.{0 if part == 'conv_in' else 2 * blocks + 2}.{tail}"] = value
        elif key.startswith("controlnet_down_blocks."):
            index, _, tail = key[len("controlnet_down_blocks."):].partition(".")
            out[f"zero_convs.{index}.0.{tail}"] = value
        elif key.startswith("controlnet_mid_block."):
            out[f"middle_block_out.0.{key[len('controlnet_mid_block.'):]}"] = value
        else:
            unet[key] = value
    # the encoder half of the UNet's table (up blocks named as a UNet of the same depth would have them)
    out.update(unet_to_ldm(unet, {**config, "up_block_types": ["UpBlock2D"] * len(config["block_out_channels"])}))
    return out


def controlnet_to_single_file(folder: str | Path, out: str | Path) -> Path:
    """Write a diffusers ControlNetModel folder as one original-layout ``.safetensors`` (``control_model.*`` keys,
    as the ``control_*.safetensors`` files of the ControlNet web UI extension)."""
    from safetensors.torch import save_file

    folder, out = Path(folder), Path(out)
    config = json.loads((folder / "config.json").read_text())
    tensors = {f"control_model.{k}": v.contiguous() for k, v in controlnet_to_ldm(_load(folder), config).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--no-vae", action="store_true", help="leave the VAE out of the file")
    ap.add_argument("--vae-out", default=None, help="also write the VAE alone (first_stage_model.* keys)")
    ap.add_argument("--v-pred-key", action="store_true", help="add ComfyUI's empty 'v_pred' marker tensor")
    args = ap.parse_args(argv)
    print(to_single_file(args.model_dir, args.out, vae=not args.no_vae, vae_out=args.vae_out,
                         v_pred_key=args.v_pred_key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
