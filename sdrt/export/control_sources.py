"""The ``--controlnet`` arguments of `sdrt export`: what each is (a diffusers ControlNetModel or T2IAdapter folder,
or an original-layout ``control_*.safetensors`` told by its keys), its config, and whether it was made for the
model: each refusal one line naming the first number that differs. Loading the PyTorch module, too.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sdrt.errors import UserError
from sdrt.runtime.control import (CONTROLNET, FIT_KEYS, T2I_ADAPTER, UNET_ADAPTER, UNET_CONTROL, check_name,
                                  control_component)
from sdrt.runtime.safetensors_file import SafetensorsFile

ORIGINAL_PREFIX = "control_model."
HINT_KEY = "input_hint_block.0.weight"
# diffusers' converter names the conditioning embedding's last convolution input_hint_block.14: 4 levels
ORIGINAL_EMBEDDING_LEVELS = 4


@dataclass
class ControlSource:
    """One ``--controlnet`` argument, inspected: what it is and the config it loads with."""

    path: Path
    name: str
    kind: str                      # CONTROLNET or T2I_ADAPTER
    config: dict
    format: str                    # "diffusers" | "original"
    files: list[Path] = field(default_factory=list)   # what its sha256 is taken over

    @property
    def component(self) -> str:
        return control_component(self.name)

    @property
    def unet_graph(self) -> str:
        return UNET_CONTROL if self.kind == CONTROLNET else UNET_ADAPTER


def parse_control_arg(text) -> tuple[Path, str]:
    """``"PATH[:NAME]"`` or ``(path, name)`` -> (path, name); the name defaults to the folder's or file's name
    (a ``control_`` prefix and the suffix dropped)."""
    if isinstance(text, (tuple, list)):
        path, name = Path(text[0]), text[1]
    else:
        text = os.fspath(text)
        head, sep, tail = text.rpartition(":")
        path, name = (Path(head), tail) if sep and head and not Path(text).exists() else (Path(text), None)
    if name is None:
        stem = path.name[:-len(".safetensors")] if path.name.endswith(".safetensors") else path.name
        name = stem[len("control_"):] if stem.startswith("control_") and len(stem) > len("control_") else stem
    return path, check_name(name)


def inspect_control(arg, unet_config: dict, numbers: dict, allow_pickle: bool = False) -> ControlSource:
    """Read ``arg``'s config (or the single file's header) and refuse, in one line, what does not fit the model."""
    from sdrt.export.checkpoint import check_weights

    path, name = parse_control_arg(arg)
    where = f"--controlnet {str(path)!r}"
    if path.is_file():
        source = _inspect_original(path, name, unet_config, where)
    elif (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{where}: unreadable config.json ({e})") from None
        cls = config.get("_class_name")
        kinds = {"ControlNetModel": CONTROLNET, "T2IAdapter": T2I_ADAPTER}
        if cls not in kinds:
            raise UserError(f"{where}: its config names {cls!r}; expected ControlNetModel or T2IAdapter (diffusers)")
        check_weights(path, allow_pickle)
        files = [path / "config.json"] + sorted(p for p in path.iterdir() if p.suffix == ".safetensors"
                                                 or (allow_pickle and p.suffix == ".bin"))
        source = ControlSource(path, name, kinds[cls], config, "diffusers", files)
    else:
        raise UserError(f"{where}: not a diffusers ControlNetModel/T2IAdapter folder (no config.json) nor a "
                        ".safetensors file")
    check_fits(source, unet_config, numbers, where)
    return source


def _inspect_original(path: Path, name: str, unet_config: dict, where: str) -> ControlSource:
    """An original-layout ControlNet file: its keys say so, its shapes say which conditioning embedding; the rest
    of its config is the base UNet's (check_fits then compares the file's shapes with it)."""
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{where}: a single-file ControlNet must be a .safetensors file")
    header = SafetensorsFile(path)
    shapes = {k: header.shape(k) for k in header.keys()}
    prefix = ORIGINAL_PREFIX if ORIGINAL_PREFIX + HINT_KEY in shapes else ""
    if prefix + HINT_KEY not in shapes or prefix + "zero_convs.0.0.weight" not in shapes:
        sample = ", ".join(sorted(shapes)[:3])
        raise UserError(f"{where}: not an original-layout ControlNet (no {ORIGINAL_PREFIX}{HINT_KEY} or "
                        f"zero_convs.0.0.weight; found {sample}, ...)")
    shapes = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    hint = sorted(int(k.split(".")[1]) for k in shapes if k.startswith("input_hint_block.") and k.endswith(".weight"))
    # conv_in (0), then pairs (C -> C, C -> C' with stride 2), then conv_out: the levels' channels are conv_in's
    # output and each pair's second output
    embedding = [shapes[HINT_KEY][0]] + [shapes[f"input_hint_block.{i}.weight"][0] for i in hint[2:-1:2]]
    if len(embedding) != ORIGINAL_EMBEDDING_LEVELS:
        raise UserError(f"{where}: its conditioning embedding has {len(embedding)} levels; diffusers converts "
                        f"original-layout files with {ORIGINAL_EMBEDDING_LEVELS}")
    keys = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
            "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
            "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim", "num_attention_heads",
            "use_linear_projection", "class_embed_type", "num_class_embeds", "upcast_attention",
            "resnet_time_scale_shift", "projection_class_embeddings_input_dim", "mid_block_type",
            "transformer_layers_per_block", "addition_embed_type", "addition_time_embed_dim")
    config = {"_class_name": "ControlNetModel", **{k: unet_config[k] for k in keys if k in unet_config},
              "conditioning_embedding_out_channels": embedding, "conditioning_channels": shapes[HINT_KEY][1]}
    # what the file's shapes say, for check_fits: conv_in, the cross-attention width, the zero convolutions
    conv_in = shapes.get("input_blocks.0.0.weight", (0, 0))
    context = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    found = {"in_channels": conv_in[1], "block_out_channels[0]": conv_in[0],
             "residuals": len([k for k in shapes if k.startswith("zero_convs.") and k.endswith(".weight")]),
             "block_out_channels[-1]": shapes.get("middle_block_out.0.weight", (0,))[0]}
    if context is not None:
        found["cross_attention_dim"] = context
    config["_file_shapes"] = found
    return ControlSource(path, name, CONTROLNET, config, "original", [path])


def residual_count(config: dict) -> int:
    """How many down residuals a ControlNet gives (and its UNet takes): conv_in's, then per block one per layer
    and one for its downsampler (every block but the last)."""
    blocks = len(config["block_out_channels"])
    return 1 + blocks * config["layers_per_block"] + blocks - 1


def fit_record(config: dict) -> dict:
    """The UNet numbers a ControlNet must share with its UNet (sdrt.runtime.control.FIT_KEYS), lists as lists."""
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in ((k, config.get(k)) for k in FIT_KEYS)}


def check_fits(source: ControlSource, unet_config: dict, numbers: dict, where: str) -> None:
    """One line naming the first number in which ``source`` was made for another model."""
    cfg, factor = source.config, numbers["vae_scale_factor"]
    if source.kind == T2I_ADAPTER:
        features, slots = adapter_features(cfg, factor), unet_adapter_slots(unet_config)
        for k, (got, want) in enumerate(zip(features or (), slots)):
            if got != want:
                raise UserError(f"{where}: a T2I-Adapter whose feature {k} has {got[0]} channels at 1/2^{got[1]} of "
                                f"the latent size; this model's UNet adds {want[0]} at 1/2^{want[1]} there (made for "
                                "another model)")
        return
    for key in FIT_KEYS:
        want, got = unet_config.get(key), cfg.get(key)
        if isinstance(want, (list, tuple)) or isinstance(got, (list, tuple)):
            want, got = list(want or ()), list(got or ())
        if want != got:
            raise UserError(f"{where}: a ControlNet for a UNet with {key}={got!r}; this model's has {want!r} "
                            "(made for another model)")
    for key, got in cfg.get("_file_shapes", {}).items():
        want = {"in_channels": unet_config["in_channels"],
                "block_out_channels[0]": unet_config["block_out_channels"][0],
                "block_out_channels[-1]": unet_config["block_out_channels"][-1],
                "residuals": residual_count(unet_config),
                "cross_attention_dim": unet_config.get("cross_attention_dim")}[key]
        if got != want:
            raise UserError(f"{where}: the file's shapes give {key}={got}; this model's UNet has {want} (made for "
                            "another model)")
    levels = len(cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256))
    if 2 ** (levels - 1) != factor:
        raise UserError(f"{where}: its conditioning embedding downsamples the control image {2 ** (levels - 1)}x; "
                        f"this model's latents are 1/{factor} of the image (made for another model)")
    if cfg.get("conditioning_channels", 3) != 3:
        raise UserError(f"{where}: it takes {cfg.get('conditioning_channels')}-channel control images; sdrt prepares "
                        "RGB (3)")
    if cfg.get("controlnet_conditioning_channel_order", "rgb") not in ("rgb", "bgr"):
        raise UserError(f"{where}: conditioning channel order {cfg['controlnet_conditioning_channel_order']!r}; "
                        "diffusers knows rgb and bgr")


def load_control(source: ControlSource, allow_pickle: bool):
    """The PyTorch module (float32, eval), weights in the process's memory."""
    import torch
    from diffusers import ControlNetModel, T2IAdapter

    where = f"--controlnet {str(source.path)!r}"
    try:
        if source.format == "original":
            with tempfile.TemporaryDirectory(prefix="sdrt-controlnet-") as configs:
                config = {k: v for k, v in source.config.items() if not k.startswith("_file")}
                (Path(configs) / "config.json").write_text(json.dumps(config))
                model = ControlNetModel.from_single_file(str(source.path), config=configs, local_files_only=True,
                                                         torch_dtype=torch.float32)
        else:
            cls = ControlNetModel if source.kind == CONTROLNET else T2IAdapter
            model = cls.from_pretrained(source.path, use_safetensors=None if allow_pickle else True,
                                        torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{where}: could not load its weights ({str(e).splitlines()[0][:300]})") from None
    return model.eval()


# ---- the graphs ----------------------------------------------------------------------------------------------


def adapter_features(config: dict, vae_factor: int) -> list[tuple[int, int]] | None:
    """A T2I-Adapter's features as (channels, level): level k is the latent size halved k times. ``full_adapter``
    unshuffles by ``downscale_factor`` and halves after its first block; ``full_adapter_xl`` halves once, before
    its third. None for a type not worked out here (the UNet's trace checks it)."""
    channels = list(config.get("channels", (320, 640, 1280, 1280)))
    kind = config.get("adapter_type", "full_adapter")
    ratio = config.get("downscale_factor", 16 if kind == "full_adapter_xl" else 8) / vae_factor
    base = int(math.log2(ratio)) if ratio >= 1 and float(ratio).is_integer() else -1
    if kind == "full_adapter":
        return [(c, base + k) for k, c in enumerate(channels)]
    if kind == "full_adapter_xl":
        return [(c, base + (k >= 2)) for k, c in enumerate(channels)]
    return None


def unet_adapter_slots(unet_config: dict) -> list[tuple[int, int]]:
    """Where diffusers' UNet adds a T2I-Adapter's features, as (channels, level): in each down block (a
    cross-attention block before its downsampler, a plain one after it), then in the mid block (where the shape
    agrees)."""
    blocks, types = unet_config["block_out_channels"], unet_config["down_block_types"]
    n = len(blocks)
    slots = [(c, i if "CrossAttn" in t or i == n - 1 else i + 1) for i, (c, t) in enumerate(zip(blocks, types))]
    return slots + [(blocks[-1], n - 1)]


def inspect_controls(args, ckpt, allow_pickle: bool) -> list[ControlSource]:
    """The ``--controlnet`` arguments inspected against the checkpoint (inspect_control); a name given twice is
    refused."""
    factor = 2 ** (len(ckpt.vae_config.get("block_out_channels", [64])) - 1)
    sources = [inspect_control(a, ckpt.unet_config, {"vae_scale_factor": factor}, allow_pickle) for a in args]
    names = [s.name for s in sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"--controlnet name {twice[0]!r} is given twice; name them apart with PATH:NAME")
    return sources
