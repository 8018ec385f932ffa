"""ControlNets as their own graphs, and the UNet that takes their residuals (``unet_control``).

Each ControlNet (a diffusers ``ControlNetModel`` folder, given as ``--controlnet DIR[:NAME]``) becomes the
component ``controlnet_NAME``: sample, timestep, encoder_hidden_states and the control image in pixels
(``controlnet_cond``, [B, 3, H, W] in [0, 1]) -> ``down_residual_0`` ... ``down_residual_{n-1}`` and
``mid_residual``, at conditioning scale 1. The scale, guess mode's per-block scales and the start/end window are
multiplications the runtime does in numpy (diffusers multiplies the same float32 residuals by the same numbers
inside the model), so one graph serves every scale. ``unet_control`` is the UNet with those residuals as inputs,
added where diffusers' ``down_block_additional_residuals`` / ``mid_block_additional_residual`` add them: a second
graph, so that the plain UNet's graph (and its speed) stays as it is. Several ControlNets' residuals are summed
by the runtime before the one ``unet_control`` call, as diffusers' MultiControlNetModel sums them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sdrt.errors import UserError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
UNET_CONTROL = "unet_control"
PREFIX = "controlnet_"
# what a ControlNet must share with the UNet it steers (its encoder is a copy of the UNet's)
MATCHING = ("cross_attention_dim", "block_out_channels", "addition_embed_type", "down_block_types",
            "layers_per_block")


def parse_spec(text: str) -> tuple[Path, str]:
    """``DIR[:NAME]`` -> (folder, name); the name defaults to the folder's, lower-cased."""
    folder, _, name = str(text).partition(":") if not Path(str(text)).exists() else (str(text), "", "")
    path = Path(folder)
    name = (name or path.name).lower().replace(" ", "-")
    if not NAME_RE.match(name):
        raise UserError(f"--controlnet {text!r}: the name {name!r} must be 1-40 of a-z, 0-9, '_' and '-' (give "
                        "DIR:NAME)")
    if not (path / "config.json").is_file():
        raise UserError(f"--controlnet {text!r}: {path} is not a diffusers ControlNetModel folder (config.json is "
                        "missing)")
    return path, name


def check_fits(name: str, config: dict, unet_config: dict) -> None:
    """A ControlNet made for another model (another width, depth or conditioning) is refused naming why."""
    if config.get("_class_name") not in (None, "ControlNetModel"):
        raise UserError(f"controlnet {name!r}: a {config.get('_class_name')}, not a ControlNetModel")
    for key in MATCHING:
        theirs, ours = config.get(key), unet_config.get(key)
        if theirs is not None and ours is not None and list(_tuple(theirs)) != list(_tuple(ours)):
            raise UserError(f"controlnet {name!r} was made for another model: its {key} is {theirs!r}, this "
                            f"model's UNet has {ours!r}")
    if unet_config.get("addition_embed_type"):
        raise UserError(f"controlnet {name!r}: SDXL ControlNets are not exported yet (SD1.x and SD2.x are)")


def _tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


class ControlNetGraph(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states, controlnet_cond) -> (*down residuals, mid residual)."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond):
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=controlnet_cond, conditioning_scale=1.0, return_dict=False)
        return (*down, mid)


class ControlledUNetGraph(torch.nn.Module):
    """The UNet graph's inputs, then the residuals -> out_sample (diffusers' additional residuals)."""

    def __init__(self, unet, extra: tuple[str, ...], n_down: int):
        super().__init__()
        self.unet, self.extra, self.n_down = unet, extra, n_down

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        extra = dict(zip(self.extra, rest[: len(self.extra)]))
        residuals = rest[len(self.extra):]
        added = {k: extra[k] for k in ("text_embeds", "time_ids") if k in extra} or None
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         timestep_cond=extra.get("timestep_cond"), added_cond_kwargs=added,
                         down_block_additional_residuals=list(residuals[: self.n_down]),
                         mid_block_additional_residual=residuals[self.n_down], return_dict=False)[0]


def residual_specs(controlnet, sample) -> list[tuple[str, str, tuple]]:
    """The residual outputs' (name, dtype, symbolic shape), their channels found by running ``controlnet``
    (the ControlNetGraph) once on ``sample``'s trace inputs."""
    with torch.no_grad():
        outs = controlnet(*sample)
    specs = []
    for i, out in enumerate(outs):
        name = f"down_residual_{i}" if i < len(outs) - 1 else "mid_residual"
        specs.append((name, "float32", ("batch", int(out.shape[1]), f"{name}_height", f"{name}_width")))
    return specs
