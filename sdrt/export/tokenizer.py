"""Export the checkpoint's tokenizer into the engine directory, in a form the runtime loads without torch.

The original files (vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json) are copied so a
reader can see what the checkpoint shipped. Beside them goes ``tokenizer.json``: the backend of transformers'
own ``CLIPTokenizer``, serialized - the very normalizer, pre-tokenizer, BPE and post-processor diffusers
runs - so the runtime needs only the ``tokenizers`` library. Before returning we encode a few probe prompts
with both and refuse the export if any id differs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sdrt.errors import UserError

# Cheap probes that exercise normalization, the pre-tokenizer's classes, special-token text and truncation.
PROBE_PROMPTS = (
    "",
    "a photo of an astronaut riding a horse on mars",
    "  Mixed CASE,\tTabs\nand   runs   of spaces!!  ",
    "it's 3.14159 o'clock; we'll see -- don't (or won't) [brackets] {braces} <|endoftext|>",
    "café naïve Über 東京 タワー 🐱‍👤 émoji ✨",
    "supercalifragilisticexpialidocious" * 4,
    " ".join(["long prompt"] * 60),
)


def export_tokenizer(model_dir: Path, out_dir: Path, folder: str = "tokenizer") -> dict:
    """Copy ``model_dir/folder`` (SDXL's second: ``tokenizer_2``) to ``out_dir``, add ``tokenizer.json``; return
    the manifest's tokenizer numbers.

    Returns ``{"max_length", "pad_token", "pad_token_id", "bos_token_id", "eos_token_id"}``: the runtime pads
    with ``pad_token_id`` (SD1 pads with ``<|endoftext|>``, SD2 with ``"!"``), so it must not guess it.
    """
    from transformers import CLIPTokenizer as HFCLIPTokenizer  # build-time only

    source = Path(model_dir) / folder
    if not source.is_dir():
        raise UserError(f"{source} is missing: a diffusers checkpoint needs a {source.name}/ folder (vocab.json, merges.txt)")
    missing = [name for name in ("vocab.json", "merges.txt") if not (source / name).is_file()]
    if missing and not (source / "tokenizer.json").is_file():
        raise UserError(f"{source} lacks {', '.join(missing)}: cannot build the CLIP tokenizer")

    reference = HFCLIPTokenizer.from_pretrained(str(source))
    max_length = reference.model_max_length
    if not isinstance(max_length, int) or not 2 <= max_length <= 65536:
        raise UserError(f"{source}/tokenizer_config.json: model_max_length {max_length!r} is not a usable length")
    if reference.pad_token is None or reference.pad_token_id is None:
        raise UserError(f"{source} defines no pad token; diffusers pads prompts to {max_length} tokens with it")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in sorted(source.iterdir()):
        if file.is_file() and file.name != "tokenizer.json":
            shutil.copy2(file, out_dir / file.name)
    _write_backend(reference, out_dir / "tokenizer.json")

    numbers = {
        "max_length": int(max_length),
        "pad_token": str(reference.pad_token),
        "pad_token_id": int(reference.pad_token_id),
        "bos_token_id": int(reference.bos_token_id),
        "eos_token_id": int(reference.eos_token_id),
    }
    _check_parity(reference, out_dir, numbers)
    return numbers


def _write_backend(reference, path: Path) -> None:
    """Serialize the backend tokenizer without the padding/truncation state transformers sets per call."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(reference.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(backend.to_str(pretty=True), encoding="utf-8")
    tmp.replace(path)


def _check_parity(reference, out_dir: Path, numbers: dict) -> None:
    """Refuse a tokenizer.json whose ids differ from transformers' on the probes (as diffusers calls it)."""
    from sdrt.runtime.tokenizer import CLIPTokenizer

    runtime = CLIPTokenizer.from_dir(out_dir, numbers["max_length"], numbers["pad_token_id"])
    if (runtime.bos_token_id, runtime.eos_token_id) != (numbers["bos_token_id"], numbers["eos_token_id"]):
        raise UserError(
            f"{out_dir}/tokenizer.json adds bos/eos {runtime.bos_token_id}/{runtime.eos_token_id}, "
            f"transformers uses {numbers['bos_token_id']}/{numbers['eos_token_id']}"
        )
    expected = reference(
        list(PROBE_PROMPTS), padding="max_length", max_length=numbers["max_length"], truncation=True
    ).input_ids
    got = runtime.encode_with_removed(list(PROBE_PROMPTS))[0].tolist()  # no truncation log at export
    for prompt, want, have in zip(PROBE_PROMPTS, expected, got):
        if list(want) != have:
            raise UserError(f"exported tokenizer differs from transformers' CLIPTokenizer on {prompt[:60]!r}")
