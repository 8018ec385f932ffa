"""Model families as adapters, chosen from the manifest's ``model.family``.

A family owns what differs between Stable Diffusion lines along the whole request path: which text encoders
it has and what their graphs return (export), what the manifest must record for it, how its prompts become
the UNet's text conditioning and which extra UNet inputs it feeds (run time), and what it refuses. Nothing
else tests a family's name: export, engines, runtime and serve ask the adapter.

Adding a family is a subclass here, registered in ``FAMILIES``, plus how export tells it from a checkpoint
(``sdrt.export.checkpoint``: model_index.json's components) and the numbers it records
(``Checkpoint.model_numbers``); a new graph wrapper only when its text encoders return something new.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Sequence

import numpy as np

from sdrt.errors import UserError

if TYPE_CHECKING:
    from sdrt.runtime.manifest import ModelNumbers


class PromptEmbeddings:
    """Text conditioning with a pooled embedding (SDXL): both encoders' penultimate hidden states side by side
    [n, L, width] and the last encoder's pooled, projected embedding [n, pooled_dim]."""

    __slots__ = ("context", "pooled")

    def __init__(self, context: np.ndarray, pooled: np.ndarray):
        self.context = context
        self.pooled = pooled


def check_finite(stage: str, array: np.ndarray, detail: str = "") -> None:
    """NaN or inf out of a stage is an error naming the stage, never a black image."""
    from sdrt.errors import StageError

    if not np.isfinite(array).all():
        raise StageError(f"{stage} produced NaN or inf{detail}; the engine or its precision is broken for these inputs")


def guidance_rows(req, texts: np.ndarray) -> np.ndarray:
    """Per-image rows of ``texts`` (the prompts', then the negatives' when encoded) in the UNet's batch
    order: [negatives, positives] when guided (diffusers' order), zeros for SDXL's zeroed negatives."""
    n = len(req.prompts)
    cond = np.repeat(texts[:n], req.num_images, axis=0)
    if not req.guided:
        return cond
    uncond = np.zeros_like(cond) if req.zero_negative else np.repeat(texts[n:], req.num_images, axis=0)
    return np.concatenate([uncond, cond])


def text_inputs(req, second: bool = False) -> list[str]:
    """The prompts a text encoder reads for ``req``: positives, then negatives when guided (and not zeros
    instead: SDXL's force_zeros_for_empty_prompt). ``second``: those SDXL's second encoder reads
    (``prompt_2`` / ``negative_prompt_2`` where given)."""
    prompts = (req.prompts_2 or req.prompts) if second else req.prompts
    negatives = (req.negative_prompts_2 or req.negative_prompts) if second else req.negative_prompts
    return prompts + (negatives if req.guided and not req.zero_negative else [])


class Family:
    """SD1.x and SD2.x, with their LCM-distilled and Turbo forms: one CLIP text encoder whose last hidden
    state (after the final norm) is the UNet's context; prompts read in weighted 75-token chunks."""

    name: ClassVar[str] = "sd"
    # (component, tokenizer folder) of each text encoder, in the order their outputs are concatenated
    text_encoders: ClassVar[tuple[tuple[str, str], ...]] = (("text_encoder", "tokenizer"),)
    # the UNet config's addition_embed_type this family's UNet has (export refuses any other)
    addition_embed_type: ClassVar[str | None] = None
    # the text encoder graphs return hidden_states[-2] (before the final norm) and the last one a pooled
    # projection, instead of last_hidden_state and pooler_output
    penultimate_text: ClassVar[bool] = False
    # UNet inputs after sample, timestep, encoder_hidden_states (timestep_cond is the model's, any family)
    unet_conditioning: ClassVar[tuple[str, ...]] = ()
    # manifest model keys this family needs beyond the common ones
    model_keys: ClassVar[tuple[str, ...]] = ()
    txt2img: ClassVar[bool] = True
    # inpainting's default strength (diffusers' inpaint pipelines: SD 1.0, SDXL 0.9999)
    inpaint_strength: ClassVar[float] = 1.0
    # diffusers reads the VAE's force_upcast only in this family's pipelines (TensorRT then builds it fp32)
    vae_upcast: ClassVar[bool] = False
    # prompts are read by sdrt.runtime.prompts (weights, chunks, BREAK, textual-inversion embeddings)
    weighted_prompts: ClassVar[bool] = True

    def __init__(self, model: "ModelNumbers"):
        self.model = model

    @classmethod
    def text_components(cls) -> tuple[str, ...]:
        return tuple(c for c, _ in cls.text_encoders)

    # ---- run time ------------------------------------------------------------------------------------
    def load_text(self, engine_dir, embeddings: Sequence, manifest):
        """(tokenizers by component, PromptReader or None, initializers by component, the loaded textual-inversion
        embeddings) for the pipeline."""
        from sdrt.runtime.prompts import PromptReader
        from sdrt.runtime.tokenizer import CLIPTokenizer

        m = self.model
        tokenizer = CLIPTokenizer.from_dir(engine_dir / "tokenizer", max_length=m.text_max_length,
                                           pad_token_id=m.pad_token_id)
        initializers, vectors, loaded = {}, {}, []
        if embeddings:  # textual inversion: the tokenizer gains the tokens, the text encoder's table the rows
            from sdrt.runtime.embeddings import add_embeddings, load_embedding

            loaded = [load_embedding(spec) for spec in embeddings]
            tokenizer, table, vectors = add_embeddings(manifest, tokenizer, loaded)
            initializers = {"text_encoder": table}
        return {"text_encoder": tokenizer}, PromptReader(tokenizer, vectors), initializers, loaded

    def encode(self, pipe, reqs: Sequence) -> list:
        """Each request's text embeddings, in one text-encoder call over all their prompt chunks: the token
        rows are concatenated and each request reassembles its own, so its embeddings do not depend on the
        others' (``[n_prompts, max_length * chunks, hidden]`` each)."""
        tokens = [req.prompt_tokens or pipe.prepare_prompts(req) for req in reqs]
        hidden = pipe.run_text_encoder(np.concatenate([t.ids for t in tokens]))
        split = np.cumsum([len(t.ids) for t in tokens])[:-1]
        return [t.assemble(h) for t, h in zip(tokens, np.split(hidden, split))]

    def conditioning(self, req, texts) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The UNet's context and its other conditioning inputs for ``req`` (``unet_batch`` rows each)."""
        return guidance_rows(req, texts), {}

    def zero_negative(self, negative_prompt) -> bool:
        """Whether the unguided half is conditioned on zeros rather than the encoded negative prompt."""
        return False


class SDXL(Family):
    """SDXL base: two CLIP encoders whose penultimate hidden states are concatenated on the width, the second
    one's pooled projection and the size/crop/target time ids as added conditions."""

    name = "sdxl"
    text_encoders = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
    addition_embed_type = "text_time"
    penultimate_text = True
    unet_conditioning = ("text_embeds", "time_ids")
    model_keys = ("text_encoders", "pooled_dim", "time_ids", "force_zeros_for_empty_prompt")
    vae_upcast = True
    inpaint_strength = 0.9999
    weighted_prompts = False   # one 77-token chunk per encoder, unweighted (as diffusers)

    def load_text(self, engine_dir, embeddings: Sequence, manifest):
        from sdrt.runtime.tokenizer import CLIPTokenizer

        if embeddings:
            raise UserError("embeddings: textual inversion is not supported for SDXL models yet")
        # each encoder with its own tokenizer (their pad tokens differ)
        tokenizers = {e["component"]: CLIPTokenizer.from_dir(
            engine_dir / e["tokenizer"], max_length=e["max_length"], pad_token_id=e["pad_token_id"])
            for e in self.model.text_encoders}
        return tokenizers, None, {}, []

    def encode(self, pipe, reqs: Sequence) -> list:
        return [pipe.encode_prompts_xl(text_inputs(req), text_inputs(req, second=True)) for req in reqs]

    def conditioning(self, req, texts: PromptEmbeddings) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return guidance_rows(req, texts.context), {"text_embeds": guidance_rows(req, texts.pooled),
                                                   "time_ids": self.time_ids(req)}

    def time_ids(self, req) -> np.ndarray:
        """The added time ids, [unet_batch, len(model.time_ids)]: sizes, crop and target size (base) or
        aesthetic score (refiner), as diffusers' _get_add_time_ids lists them."""
        names = self.model.time_ids
        size = (req.height, req.width)
        values = {"original": req.original_size or size, "crop": req.crop, "target": req.target_size or size}
        pos = _time_id_row(names, values, req.aesthetic_score)
        # the refiner's unguided half: the negative aesthetic score and no crop (diffusers'
        # negative_crops_coords_top_left); the base's is the positive row
        neg = _time_id_row(names, dict(values, crop=(0, 0)), req.negative_aesthetic_score) \
            if "aesthetic_score" in names else pos
        rows = [np.tile(neg, (req.batch, 1))] if req.guided else []
        return np.concatenate(rows + [np.tile(pos, (req.batch, 1))]).astype(np.float32)

    def zero_negative(self, negative_prompt) -> bool:
        return negative_prompt is None and self.model.force_zeros_for_empty_prompt


class SDXLRefiner(SDXL):
    """The SDXL refiner: the second encoder alone, aesthetic-score time ids; it only refines an image."""

    name = "sdxl-refiner"
    text_encoders = (("text_encoder_2", "tokenizer_2"),)
    txt2img = False


def _time_id_row(names: Sequence[str], values: dict, aesthetic_score: float) -> np.ndarray:
    table = {"original_height": values["original"][0], "original_width": values["original"][1],
             "crop_top": values["crop"][0], "crop_left": values["crop"][1],
             "target_height": values["target"][0], "target_width": values["target"][1],
             "aesthetic_score": aesthetic_score}
    return np.array([table[n] for n in names], dtype=np.float32)


FAMILIES: dict[str, type[Family]] = {f.name: f for f in (Family, SDXL, SDXLRefiner)}
DEFAULT_FAMILY = Family.name   # manifests older than SDXL support have no family: SD1/SD2


def family_class(name: str | None) -> type[Family]:
    """The adapter class of a manifest's ``model.family`` (absent: SD1/SD2)."""
    cls = FAMILIES.get(name or DEFAULT_FAMILY)
    if cls is None:
        raise UserError(f"manifest model family {name!r}: this sdrt reads {', '.join(FAMILIES)}")
    return cls


def family_of(model: "ModelNumbers") -> Family:
    return family_class(model.family)(model)
