"""The diffusers reference, for `sdrt bench` and the tests: the pipeline and scheduler each sdrt name stands for (needs torch)."""

from __future__ import annotations

import json
from pathlib import Path

SCHEDULER_CLASSES = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler",
                 {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}

# the checkpoint's pipeline class -> (txt2img class, img2img class, extra from_pretrained arguments)
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                                {"safety_checker": None, "requires_safety_checker": False}),
    # img2img of an LCM UNet as StableDiffusionImg2ImgPipeline runs it (the usual schedule cut by strength);
    # LatentConsistencyModelImg2ImgPipeline shortens the LCM schedule itself, which sdrt does not do
    "LatentConsistencyModelPipeline": ("LatentConsistencyModelPipeline", "StableDiffusionImg2ImgPipeline",
                                       {"safety_checker": None, "requires_safety_checker": False}),
    # no invisible watermark: it changes the pixels (diffusers adds it when the package is installed)
    "StableDiffusionXLPipeline": ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                                  {"add_watermarker": False}),
}
PIPELINE_CLASSES["StableDiffusionImg2ImgPipeline"] = PIPELINE_CLASSES["StableDiffusionPipeline"]
PIPELINE_CLASSES["StableDiffusionXLImg2ImgPipeline"] = PIPELINE_CLASSES["StableDiffusionXLPipeline"]


def diffusers_scheduler(name: str | None, config: dict):
    """diffusers' scheduler for an sdrt scheduler name (None: the config's own class)."""
    import diffusers

    if name is None:
        return getattr(diffusers, config["_class_name"]).from_config(config)
    cls, overrides = SCHEDULER_CLASSES[name]
    return getattr(diffusers, cls).from_config(config, **overrides)


def diffusers_pipeline(model_dir, img2img: bool = False, dtype=None):
    """The diffusers pipeline the checkpoint's model_index names (SD, LCM or SDXL), for txt2img or img2img."""
    import diffusers
    import torch

    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    txt2img, image2image, kwargs = PIPELINE_CLASSES[index.get("_class_name") or "StableDiffusionPipeline"]
    cls = getattr(diffusers, image2image if img2img else txt2img)
    pipe = cls.from_pretrained(model_dir, dtype=dtype or torch.float32, **kwargs)  # torch_dtype is deprecated
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reads_like_diffusers(tokenizer, prompt: str) -> bool:
    """Whether sdrt reads ``prompt`` as diffusers does: no emphasis syntax, and one chunk of tokens."""
    from sdrt.runtime.prompts import parse_prompt_attention

    return (parse_prompt_attention(prompt) == [(prompt, 1.0)]
            and len(tokenizer(prompt).input_ids) <= tokenizer.model_max_length)


def a1111_prompt_embeds(pipe, prompts: list[str], word_wrap: int = 20):
    """AUTOMATIC1111's reading of ``prompts`` with a diffusers pipeline's own tokenizer and text encoder
    (torch): emphasis, BREAK, 75-token chunks with their own bos/eos (wrapped at a comma at most ``word_wrap``
    tokens back), a textual-inversion embedding's vectors kept in one chunk, weights applied to the hidden
    states and each chunk's mean restored; every prompt padded with empty chunks to the same count.

    Written after that tool's ``sd_hijack_clip`` (``tokenize_line``, ``process_tokens``, ``EmphasisOriginal``)
    on transformers' tokenizer, apart from sdrt's runtime; returns ``[len(prompts), 77 * chunks, hidden]``.
    """
    import torch

    from sdrt.runtime.prompts import parse_prompt_attention

    tok = pipe.tokenizer
    size = tok.model_max_length - 2
    comma = tok.convert_tokens_to_ids(",</w>")
    added = tok.get_added_vocab()  # textual-inversion tokens: NAME, NAME_1, ... as load_textual_inversion adds them

    def vectors(token_id: int) -> list[int]:
        name = tok.convert_ids_to_tokens(token_id)
        if name not in added or name.rsplit("_", 1)[-1].isdigit() and name.rsplit("_", 1)[0] in added:
            return [token_id]
        group, i = [token_id], 1
        while f"{name}_{i}" in added:
            group.append(added[f"{name}_{i}"])
            i += 1
        return group

    def tokenize_line(line: str) -> list[tuple[list[int], list[float]]]:
        chunks, ids, mults, last_comma = [], [], [], -1

        def next_chunk():
            nonlocal ids, mults, last_comma
            chunks.append((ids, mults))
            ids, mults, last_comma = [], [], -1

        for text, weight in parse_prompt_attention(line):
            if text is None:
                next_chunk()
                continue
            for t in tok(text, add_special_tokens=False).input_ids:
                if t == comma:
                    last_comma = len(ids)
                elif word_wrap and len(ids) == size and last_comma != -1 and len(ids) - last_comma <= word_wrap:
                    keep = last_comma + 1
                    rest = ids[keep:], mults[keep:]
                    ids, mults = ids[:keep], mults[:keep]
                    next_chunk()
                    ids, mults = list(rest[0]), list(rest[1])
                if len(ids) == size:
                    next_chunk()
                emb = vectors(t)
                if len(ids) + len(emb) > size:
                    next_chunk()
                ids = ids + emb
                mults = mults + [weight] * len(emb)
        if ids or not chunks:
            next_chunk()
        return chunks

    lines = [tokenize_line(p) for p in prompts]
    count = max(len(c) for c in lines)
    out = []
    device = pipe.text_encoder.device
    with torch.no_grad():
        for chunks in lines:
            zs = []
            for j in range(count):
                ids, mults = chunks[j] if j < len(chunks) else ([], [])
                row = [tok.bos_token_id] + ids + [tok.eos_token_id]
                row += [tok.pad_token_id] * (tok.model_max_length - len(row))
                w = torch.tensor([1.0] + mults + [1.0] * (tok.model_max_length - 1 - len(mults)), device=device)
                z = pipe.text_encoder(torch.tensor([row], device=device))[0][0]
                original = z.mean()
                z = z * w[:, None]
                zs.append(z * (original / z.mean()))
            out.append(torch.cat(zs))
    return torch.stack(out)
