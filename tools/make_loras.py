"""Write random LoRA files for a diffusers checkpoint, in the key layouts trainers ship them in.

* ``kohya`` (sd-scripts): ``lora_unet_<module path with _>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``,
  ``lora_te_...`` for the text encoder (SDXL: ``lora_te1_`` / ``lora_te2_``). Written by hand, as sd-scripts
  writes them; with ``sgm`` the UNet's module paths are the original (SGM/LDM) layout's, as sd-scripts names
  SDXL's (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``).
* ``peft`` (diffusers): ``unet.<module path>.lora_A.weight`` / ``lora_B.weight``, saved by diffusers'
  ``save_lora_weights`` with the peft ``LoraConfig`` (rank, alpha, targets) as its adapter metadata.

Targets are what kohya's ``networks.lora`` trains: in the UNet every Linear and 1x1 Conv of the transformer
blocks (attention q/k/v/out, feed-forward, proj_in/proj_out), plus, with ``conv``, the 3x3 convolutions of the
ResNet blocks (LoCon); in the text encoder the attention and MLP projections. Values are random with a
spread that visibly changes the pictures.

    python -m tools.make_loras MODEL_DIR OUT.safetensors [--format kohya|peft] [--rank R] [--alpha A] [--seed N]
                               [--sgm]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
CONV_TARGETS = ("conv1", "conv2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def lora_targets(model, suffixes, conv: bool = False) -> dict[str, tuple]:
    """module path -> weight shape, for the Linear/Conv2d modules a LoRA of this kind trains."""
    import torch

    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if any(name == s or name.endswith("." + s) for s in suffixes) or (
                conv and ".resnets." in name and name.rsplit(".", 1)[-1] in CONV_TARGETS):
            out[name] = tuple(m.weight.shape)
    return out


def random_pairs(targets: dict[str, tuple], rank: int, seed: int, spread: float = 1.0) -> dict[str, tuple]:
    """module path -> (down [rank, in(, kh, kw)], up [out, rank(, 1, 1)]) as float32 torch tensors."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, shape in targets.items():
        fan_in = int(torch.tensor(shape[1:]).prod())
        down_shape = (rank, *shape[1:])
        up_shape = (shape[0], rank) + ((1, 1) if len(shape) == 4 else ())
        down = torch.randn(down_shape, generator=g) / fan_in ** 0.5
        up = torch.randn(up_shape, generator=g) * spread / rank ** 0.5
        pairs[name] = (down, up)
    return pairs


def make_lora(model_dir: str | Path, out: str | Path, fmt: str = "kohya", rank: int = 4, alpha: float | None = None,
              seed: int = 0, text_encoder: bool = True, conv: bool = False, spread: float = 0.5,
              sgm: bool = False) -> Path:
    """A random LoRA for the checkpoint at ``model_dir`` (UNet, and the text encoder(s) unless told not to)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    import torch

    model_dir, out = Path(model_dir), Path(out)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model_dir / "unet"))
    layers_per_block = unet.config.layers_per_block
    parts = {"unet": random_pairs(lora_targets(unet, UNET_TARGETS, conv), rank, seed, spread)}
    del unet
    encoders = [c for c in ("text_encoder", "text_encoder_2") if (model_dir / c).is_dir()] if text_encoder else []
    for i, comp in enumerate(encoders):
        from transformers import CLIPTextModel

        with torch.device("meta"):  # the projection (text_encoder_2) is not a LoRA target
            te = CLIPTextModel(CLIPTextConfig.from_pretrained(model_dir / comp))
        # named as released files name them: text_model.encoder... (transformers >= 5.6 dropped "text_model.")
        targets = {n if n.startswith("text_model.") else f"text_model.{n}": shape
                   for n, shape in lora_targets(te, TEXT_TARGETS).items()}
        parts[comp] = random_pairs(targets, rank, seed + 1 + i, spread)
        del te
    if sgm:
        if fmt != "kohya":
            raise SystemExit("--sgm names the UNet's modules as kohya's SDXL files do: use it with --format kohya")
        parts["unet"] = {to_sgm(name, layers_per_block): pair for name, pair in parts["unet"].items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "kohya":
        _write_kohya(parts, out, rank if alpha is None else alpha)
    elif fmt == "peft":
        _write_peft(parts, out, rank, alpha)
    else:
        raise SystemExit(f"unknown LoRA format {fmt!r}; choose kohya or peft")
    return out


def to_sgm(name: str, layers_per_block: int) -> str:
    """A diffusers UNet module path -> the original (SGM/LDM) layout's, as sd-scripts names SDXL modules."""
    import re

    per = layers_per_block + 1
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
    m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name)
    mid = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        block, layer, rest = int(m[2]), int(m[4]), m[5]
        index = block * per + layer + (1 if m[1] == "down_blocks" else 0)
        outer = "input_blocks" if m[1] == "down_blocks" else "output_blocks"
        inner = 0 if m[3] == "resnets" else 1
    elif mid:
        rest, outer = mid[3], "middle_block"
        index = {"resnets": 2 * int(mid[2]), "attentions": 1}[mid[1]]
        return f"middle_block.{index}.{resnet.get(rest, rest) if mid[1] == 'resnets' else rest}"
    else:
        raise SystemExit(f"{name}: no original-layout name for it here")
    if inner == 0:
        rest = resnet.get(rest, rest)
    return f"{outer}.{index}.{inner}.{rest}"


def _write_kohya(parts: dict, out: Path, alpha: float) -> None:
    import torch
    from safetensors.torch import save_file

    xl = "text_encoder_2" in parts
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if xl else "lora_te_", "text_encoder_2": "lora_te2_"}
    tensors = {}
    for component, pairs in parts.items():
        for name, (down, up) in pairs.items():
            key = prefix[component] + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down.contiguous()
            tensors[f"{key}.lora_up.weight"] = up.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(out), metadata={"ss_network_module": "networks.lora", "ss_network_alpha": str(alpha)})


def _write_peft(parts: dict, out: Path, rank: int, alpha: float | None) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft import LoraConfig

    layers, metadata = {}, {}
    for component, pairs in parts.items():
        layers[component] = {}
        for name, (down, up) in pairs.items():
            layers[component][f"{name}.lora_A.weight"] = down.contiguous()
            layers[component][f"{name}.lora_B.weight"] = up.contiguous()
        # targets as training scripts name them: the modules' last names (peft matches them as suffixes)
        suffixes = UNET_TARGETS + CONV_TARGETS if component == "unet" else TEXT_TARGETS
        targets = sorted({s for name in pairs for s in suffixes if name == s or name.endswith("." + s)})
        config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=targets)
        metadata[component] = json.loads(json.dumps(config.to_dict(), default=list))
    xl = {}
    if "text_encoder_2" in parts:
        xl = dict(text_encoder_2_lora_layers=layers["text_encoder_2"],
                  text_encoder_2_lora_adapter_metadata=metadata["text_encoder_2"])
    (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).save_lora_weights(
        out.parent, unet_lora_layers=layers.get("unet"), text_encoder_lora_layers=layers.get("text_encoder"),
        unet_lora_adapter_metadata=metadata.get("unet"),
        text_encoder_lora_adapter_metadata=metadata.get("text_encoder"), weight_name=out.name, **xl)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--format", default="kohya", choices=["kohya", "peft"])
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=None, help="default: the rank (scale 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-text-encoder", action="store_true")
    ap.add_argument("--conv", action="store_true", help="also the ResNet blocks' 3x3 convolutions (LoCon)")
    ap.add_argument("--sgm", action="store_true",
                    help="kohya: the UNet's modules in the original layout's names, as sd-scripts writes SDXL LoRAs")
    args = ap.parse_args(argv)
    print(make_lora(args.model_dir, args.out, args.format, args.rank, args.alpha, args.seed,
                    text_encoder=not args.no_text_encoder, conv=args.conv, sgm=args.sgm))
    return 0


if __name__ == "__main__":
    sys.exit(main())
