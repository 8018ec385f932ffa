"""LoRA files read and turned into weight deltas with numpy: what `sdrt export --lora` fuses into the weights
and what the runtime adds to the exported ones (``Pipeline(loras=...)``), one computation for both.

Formats (``.safetensors`` only; a pickle file is refused):

- **kohya** (sd-scripts, A1111/ComfyUI): ``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha``; the text encoder as ``lora_te_`` (``lora_te1_``/``lora_te2_`` for SDXL's two). Scale alpha/rank,
  1 without an alpha. The UNet's module path is diffusers' (``down_blocks_1_attentions_0_...``) or, as
  sd-scripts writes SDXL LoRAs, the original (SGM/LDM) one (``input_blocks_4_1_...``), mapped to diffusers'
  as diffusers maps it (:func:`sgm_to_diffusers`).
- **diffusers/peft**: ``unet.<module path>.lora_A.weight`` / ``.lora_B.weight`` (and ``text_encoder.``...), with
  alpha and rank from the ``lora_adapter_metadata`` diffusers writes in the file's metadata (``unet.lora_alpha``,
  ``unet.r``, ``alpha_pattern``, ``rank_pattern``, ``use_rslora``), or ``.alpha`` entries; scale 1 without.

A layer's delta is ``scale * alpha/rank * up @ down`` in the layout of the torch weight it patches (``[out, in]``
for a Linear, ``[out, in, kh, kw]`` for a Conv2d, whose LoRA is a kh x kw conv down and a 1x1 conv up). Names
are matched against the model's weights (the export's weight map at run time, the torch modules at export):
a key that matches no weight is an error naming it, never ignored.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from sdrt.errors import UserError
from sdrt.runtime.safetensors_file import SafetensorsFile

PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt", ".pth")
# file prefix -> the engine component it patches
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
PEFT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
PEFT_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                 ".lora.up.weight": "up", ".alpha": "alpha"}
# what other trainers write (a pattern in a key), named when refused
UNSUPPORTED = {r"\.hada_": "LoHa (LyCORIS)", r"\.lokr_": "LoKr (LyCORIS)", r"dora_scale$": "DoRA",
               r"lora_magnitude_vector": "DoRA", r"\.lora_mid\.": "LoCon with a Tucker core (LyCORIS)",
               r"\.diff(_b)?$": "a full weight difference (LyCORIS)", r"lora_B\.bias$": "a LoRA with biases"}


# the original UNet's module names (SGM/LDM layout, as kohya writes SDXL LoRAs) -> diffusers', "_"-joined
SGM_TOP = {"time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2",
           "label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2",
           "input_blocks_0_0": "conv_in", "out_2": "conv_out"}
SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
              "skip_connection": "conv_shortcut"}


def sgm_to_diffusers(module: str, layers_per_block: int) -> str | None:
    """A UNet module path in the original layout (``_``-joined, as kohya writes it) -> diffusers' path, or None
    when ``module`` is not in that layout. ``layers_per_block``: the UNet's (down blocks have that many ResNets,
    up blocks one more), which numbers the original's flat ``input_blocks`` / ``output_blocks``."""
    if module in SGM_TOP:
        return SGM_TOP[module]
    m = re.fullmatch(r"(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)", module) or \
        re.fullmatch(r"(middle_block)_(\d+)_(.+)", module)
    if m is None:
        return None
    if m[1] == "middle_block":
        j, rest = int(m[2]), m[3]
        if j > 2:
            return None
        inner, layer = (("resnets", 0), ("attentions", 0), ("resnets", 1))[j]
        prefix = "mid_block"
    else:
        i, j, rest = int(m[2]), int(m[3]), m[4]
        per = layers_per_block + 1
        if m[1] == "input_blocks":
            block, layer = divmod(i - 1, per)
            if rest == "op":
                return f"down_blocks_{block}_downsamplers_0_conv"
            prefix = f"down_blocks_{block}"
        else:
            block, layer = divmod(i, per)
            if rest == "conv":
                return f"up_blocks_{block}_upsamplers_0_conv"
            prefix = f"up_blocks_{block}"
        inner = "resnets" if j == 0 else "attentions"
    if inner == "resnets":
        rest = SGM_RESNET.get(rest, rest)
    return f"{prefix}_{inner}_{layer}_{rest}"


def _layers_per_block(modules) -> int:
    """The UNet's layers_per_block, read from its module names (the ResNets of its first down block)."""
    found = [int(m) for m in re.findall(r"^down_blocks_0_resnets_(\d+)_", "\n".join(modules), re.M)]
    return max(found) + 1 if found else 1


@dataclass(frozen=True)
class LoraLayer:
    """One low-rank pair: ``up`` [out, rank(, 1, 1)] @ ``down`` [rank, in(, kh, kw)], times ``alpha / rank``."""

    key: str             # the layer's name in the file, for messages
    down: np.ndarray
    up: np.ndarray
    alpha: float | None  # None: scale 1 (alpha = rank)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def factors(self, shape: Sequence[int], scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(``scale * alpha/rank * up`` [out, rank], ``down`` [rank, in * kh * kw]) for the weight of ``shape``."""
        r = self.rank
        up = self.up.reshape(self.up.shape[0], -1)
        down = self.down.reshape(r, -1)
        size = int(np.prod(shape))
        if up.shape[1] != r or up.shape[0] != shape[0] or up.shape[0] * down.shape[1] != size:
            raise UserError(
                f"LoRA layer {self.key!r}: up {list(self.up.shape)} x down {list(self.down.shape)} does not fit "
                f"the model's weight {list(shape)} (a LoRA made for another model?)")
        factor = np.float32(scale * (1.0 if self.alpha is None else self.alpha / r))
        return up.astype(np.float32) * factor, down.astype(np.float32)

    def delta(self, shape: Sequence[int], scale: float = 1.0) -> np.ndarray:
        """``scale * alpha/rank * up @ down`` as a float32 array of the patched weight's ``shape``."""
        return Delta(tuple(shape), [self.factors(shape, scale)]).value()


@dataclass
class Delta:
    """The summed delta of one weight, kept as low-rank factors (sum of up @ down) until it is laid out."""

    shape: tuple[int, ...]                        # the torch weight's
    factors: list[tuple[np.ndarray, np.ndarray]]  # (up [out, r], down [r, in * kh * kw]), scales folded into up

    def value(self, rows: Sequence[int] | None = None, transpose: bool = False,
              scratch: np.ndarray | None = None) -> np.ndarray:
        """The delta in the torch layout, or its ``rows`` [start, stop), or (``transpose``) those as a matrix
        transposed, computed as down.T @ up.T so that it comes out contiguous. With ``scratch`` (a flat float32
        buffer at least as large), the result is a view of it: no fresh memory to fault in per weight."""
        out = None
        for up, down in self.factors:
            u = up if rows is None else up[rows[0]:rows[1]]
            a, b = (down.T, u.T) if transpose else (u, down)
            if out is None:
                size = a.shape[0] * b.shape[1]
                buf = None if scratch is None or scratch.size < size else scratch[:size].reshape(a.shape[0], -1)
                out = np.matmul(a, b, out=buf)
            else:
                out += a @ b
        if transpose:
            return out
        return out.reshape((out.shape[0], *self.shape[1:]))


@dataclass
class LoraFile:
    """A parsed LoRA file: per engine component, its layers by the name the file gives the module."""

    path: Path
    format: str                                   # "kohya" or "peft"
    layers: dict[str, dict[str, LoraLayer]]       # component -> module name (kohya: with _) -> layer

    @property
    def components(self) -> list[str]:
        return sorted(self.layers)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LoraFile":
        path = Path(path)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise UserError(f"--lora {path}: pickle-based LoRA files ({path.suffix}) can run code; convert it to "
                            f".safetensors")
        st = SafetensorsFile(path)
        keys = st.keys()
        for key in keys:
            for pattern, what in UNSUPPORTED.items():
                if re.search(pattern, key):
                    raise UserError(f"--lora {path}: key {key!r} is {what}, which sdrt does not apply; "
                                    "supported: LoRA (kohya lora_down/lora_up, diffusers/peft lora_A/lora_B)")
        kohya = any(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys)
        prefixes, suffixes = (KOHYA_PREFIXES, KOHYA_SUFFIXES) if kohya else (PEFT_PREFIXES, PEFT_SUFFIXES)
        parts: dict[tuple[str, str], dict[str, str]] = {}
        unknown = []
        for key in keys:
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            suffix = next((s for s in suffixes if key.endswith(s)), None)
            if prefix is None or suffix is None or len(key) <= len(prefix) + len(suffix):
                unknown.append(key)
                continue
            module = key[len(prefix):-len(suffix)]
            parts.setdefault((prefixes[prefix], module), {})[suffixes[suffix]] = key
        if unknown:
            raise UserError(f"--lora {path}: {len(unknown)} key(s) in no LoRA layout sdrt reads: "
                            f"{_names(unknown)}; expected kohya (lora_unet_*/lora_te_*) or diffusers/peft "
                            "(unet.*/text_encoder.* with lora_A/lora_B)")
        if not parts:
            raise UserError(f"--lora {path}: holds no LoRA layers")
        config = _peft_config(st) if not kohya else {}
        layers: dict[str, dict[str, LoraLayer]] = {}
        for (component, module), found in parts.items():
            if "down" not in found or "up" not in found:
                missing = "up" if "up" in found or "down" in found else "down and up"
                raise UserError(f"--lora {path}: layer {module!r} has no {missing} weight")
            down, up = st.read(found["down"]), st.read(found["up"])
            alpha = float(st.read(found["alpha"]).reshape(-1)[0]) if "alpha" in found else None
            if alpha is None and component in config:
                alpha = _peft_alpha(config[component], module, down.shape[0])
            if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0] or (
                    up.ndim == 4 and up.shape[2:] != (1, 1)):
                raise UserError(f"--lora {path}: layer {module!r} has up {list(up.shape)} and down "
                                f"{list(down.shape)}, not a low-rank pair")
            layers.setdefault(component, {})[module] = LoraLayer(module, down, up, alpha)
        return cls(path, "kohya" if kohya else "peft", layers)

    def match(self, component: str, weights: Iterable[str]) -> dict[str, LoraLayer]:
        """This file's layers for ``component``, by the model weight each patches (``<module path>.weight``).
        A layer that matches none of ``weights`` is an error naming it."""
        layers = self.layers.get(component, {})
        if not layers:
            return {}
        by_module = {w[: -len(".weight")]: w for w in weights if w.endswith(".weight")}
        sep = "_" if self.format == "kohya" else "."  # kohya flattens the module path with "_"
        if sep == "_":
            by_module = {m.replace(".", "_"): w for m, w in by_module.items()}
        # CLIP's modules are text_model.encoder... in most files; transformers >= 5.6 dropped "text_model.":
        # either spelling matches either model
        if component.startswith("text_encoder"):
            outer = f"text_model{sep}"
            aliases = {m[len(outer):] if m.startswith(outer) else outer + m: w for m, w in by_module.items()}
            by_module = {**aliases, **by_module}
        if component == "unet" and sep == "_" and any(sgm_to_diffusers(m, 1) for m in layers):
            per = _layers_per_block(by_module)  # an original-layout (SGM) file: its names as diffusers'
            by_module = {**by_module, **{m: by_module[d] for m in layers
                                         if (d := sgm_to_diffusers(m, per)) in by_module}}
        matched = {by_module[m]: layer for m, layer in layers.items() if m in by_module}
        unmatched = [m for m in layers if m not in by_module]
        if unmatched:
            raise UserError(f"--lora {self.path}: {len(unmatched)} {component} layer(s) match no weight of this "
                            f"model: {_names(unmatched)}")
        return matched


def _names(items: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(repr(k) for k in list(items)[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _peft_config(st: SafetensorsFile) -> dict[str, dict]:
    """diffusers' ``lora_adapter_metadata`` (a JSON string in the file's metadata), by component."""
    raw = st.metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        raise UserError(f"--lora {st.path}: its lora_adapter_metadata is not JSON") from None
    out: dict[str, dict] = {}
    for key, value in flat.items():
        prefix = next((p for p in PEFT_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            out.setdefault(PEFT_PREFIXES[prefix], {})[key[len(prefix):]] = value
    for component, cfg in out.items():
        if cfg.get("use_dora"):
            raise UserError(f"--lora {st.path}: {component} is DoRA (use_dora), which sdrt does not apply")
    return out


def _pattern(patterns: Mapping[str, float] | None, module: str):
    """peft's rank/alpha patterns: a key matches a module whose path is the key or ends with '.' + key."""
    for key, value in (patterns or {}).items():
        try:
            hit = re.fullmatch(rf"(.*\.)?({key})", module)
        except re.error:
            hit = module == key or module.endswith("." + key)
        if hit:
            return value
    return None


def _peft_alpha(cfg: dict, module: str, rank: int) -> float | None:
    """The alpha that gives peft's scaling (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA) for our alpha/rank."""
    alpha = _pattern(cfg.get("alpha_pattern"), module)
    alpha = cfg.get("lora_alpha") if alpha is None else alpha
    if alpha is None:
        return None
    if cfg.get("use_rslora"):
        return float(alpha) * rank / np.sqrt(rank)
    return float(alpha)


# ---- FILE[:SCALE] and several files -----------------------------------------------------------------------

def parse_lora_arg(text: str | os.PathLike) -> tuple[Path, float]:
    """``FILE[:SCALE]`` -> (file, scale; 1.0 when absent); a path that exists as given is never split."""
    text = os.fspath(text)
    if ":" in text and not Path(text).exists():
        path, scale = text.rsplit(":", 1)
        try:
            value = float(scale)
        except ValueError:
            raise UserError(f"--lora {text!r}: SCALE {scale!r} must be a number (FILE[:SCALE])") from None
        if not np.isfinite(value):
            raise UserError(f"--lora {text!r}: SCALE must be a finite number")
        return Path(path), value
    return Path(text), 1.0


def load_loras(loras: Iterable) -> list[tuple[LoraFile, float]]:
    """Each of ``loras`` (``"FILE[:SCALE]"``, a path, or ``(file, scale)``) read once, with its scale."""
    out = []
    for spec in loras or ():
        if isinstance(spec, (tuple, list)):
            source, scale = spec[0], float(spec[1])
            if not np.isfinite(scale):
                raise UserError(f"LoRA {source}: scale {spec[1]!r} must be a finite number")
        else:
            source, scale = (spec, 1.0) if isinstance(spec, LoraFile) else parse_lora_arg(spec)
        out.append((source if isinstance(source, LoraFile) else LoraFile.load(source), scale))
    return out


def check_components(loras: Sequence[tuple[LoraFile, float]], components: Iterable[str], where: str) -> None:
    """Every component the LoRAs patch is one of ``components`` (those ``where`` has)."""
    have = set(components)
    for lora, _ in loras:
        missing = [c for c in lora.components if c not in have]
        if missing:
            raise UserError(f"--lora {lora.path}: patches {', '.join(missing)}, which {where} does not have "
                            f"(it has {', '.join(sorted(have))})")


def lora_deltas(loras: Sequence[tuple[LoraFile, float]], component: str,
                weights: Mapping[str, Sequence[int]]) -> Iterator[tuple[str, Delta]]:
    """(weight name, its summed delta) for every weight of ``component`` that ``loras`` patch. Every file is
    matched first (an unmatched layer fails before any work); each delta is laid out by the caller, one
    weight at a time, so only one full-size delta is alive at once.

    ``weights``: weight name (``<module path>.weight``) -> shape, every weight a LoRA may patch.
    """
    matches = [(lora.match(component, weights), scale) for lora, scale in loras]
    for weight in dict.fromkeys(w for layers, _ in matches for w in layers):
        shape = tuple(weights[weight])
        yield weight, Delta(shape, [layers[weight].factors(shape, scale) for layers, scale in matches
                                    if weight in layers])


# ---- run time: the exported initializers, patched -----------------------------------------------------------

def read_weight_map(manifest, component: str) -> dict[str, dict]:
    """The export's record of ``component``: weight name -> {"shape", "initializers": [{"name", "transpose",
    "rows"?}]} (or {"shape", "unmapped": why}); see sdrt.export.weight_map."""
    entry = manifest.component(component).get("weight_map")
    if not entry:
        raise UserError(f"{manifest.engine_dir}: component {component!r} has no weight map (exported by an older "
                        f"sdrt); re-export it to apply LoRAs at run time, or fuse them with `sdrt export --lora`")
    path = Path(manifest.engine_dir) / entry["file"]
    try:
        return json.loads(path.read_text())["weights"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: unreadable weight map ({e}); re-export the engine") from None


def lora_initializers(manifest, component: str, loras: Sequence[tuple[LoraFile, float]]) -> dict[str, np.ndarray]:
    """ONNX initializer name -> its exported value plus the LoRAs' delta, for every initializer of
    ``component`` the LoRAs touch (what ``Backend.load(..., initializers=)`` takes). One weight's delta is
    alive at a time beside the patched values."""
    if not any(component in lora.layers for lora, _ in loras):
        return {}
    from sdrt.runtime.onnx_weights import graph_initializers

    weights = read_weight_map(manifest, component)
    graph_path = manifest.graph_path(component)
    stored = graph_initializers(graph_path)
    patched: dict[str, np.ndarray] = {}
    touched = [int(np.prod(e["shape"])) for e in weights.values()]
    scratch = np.empty(max(touched, default=0), np.float32)  # every delta is laid out here in turn
    for weight, delta in lora_deltas(loras, component, {w: e["shape"] for w, e in weights.items()}):
        entry = weights[weight]
        if "unused" in entry:  # the graph does not read it (SDXL's first text encoder's last layer)
            continue
        if "initializers" not in entry:
            raise UserError(f"{component}: a LoRA patches {weight!r}, which the export could not locate in the "
                            f"graph ({entry.get('unmapped')}); fuse this LoRA with `sdrt export --lora`")
        for place in entry["initializers"]:
            name = place["name"]
            init = stored.get(name)
            if init is None or init.dtype != "float32":
                raise UserError(f"{graph_path}: initializer {name!r} of {weight!r} is not the float32 weight the "
                                f"weight map records (corrupt engine directory; re-export)")
            if init.file is None or init.file == graph_path:
                raise UserError(f"{graph_path}: initializer {name!r} is stored inside the graph, not in its weights "
                                f"file (an engine exported by an older sdrt); re-export it to apply LoRAs")
            part = delta.value(place.get("rows"), place.get("transpose", False), scratch)
            if part.size != int(np.prod(init.shape)):
                raise UserError(f"{graph_path}: initializer {name!r} is {list(init.shape)}, not the {list(part.shape)} "
                                f"the weight map records for {weight!r} (corrupt engine directory; re-export)")
            value = init.read()
            value += part.reshape(init.shape)  # a 1x1 conv may be stored as a matrix
            patched[name] = value
            del part
    return patched
