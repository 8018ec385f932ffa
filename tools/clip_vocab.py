"""The real CLIP BPE vocabulary, written as a released Stable Diffusion checkpoint ships its tokenizer folder.

No weights or hub downloads: the merges come from ``clip/bpe_simple_vocab_16e6.txt.gz`` inside the
``clip-anytorch`` wheel (install it with ``--no-deps``). vocab.json is derived exactly as OpenAI's
SimpleTokenizer and transformers derive it: the 256 byte characters, the same with ``</w>``, one entry per
merge (48894), then ``<|startoftext|>`` and ``<|endoftext|>``: 49408 ids.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from sdrt.export.clip_vocab import BOS, EOS, N_MERGES, vocab_from_merges, write_vocab_files  # noqa: F401


def bpe_vocab_path() -> Path:
    spec = importlib.util.find_spec("clip")  # locate without importing (clip's __init__ needs pkg_resources)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("clip-anytorch is not installed: pip install --no-deps clip-anytorch")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the clip-anytorch install")
    return path


@lru_cache(maxsize=1)
def clip_merges_and_vocab() -> tuple[list[str], dict[str, int]]:
    lines = gzip.open(bpe_vocab_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    return merges, vocab_from_merges(merges)


def write_clip_tokenizer(folder: str | Path, pad_token: str = EOS, model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json as SD checkpoints do.

    SD1.x pads with ``<|endoftext|>``; SD2.x with ``"!"`` (id 0).
    """
    folder = Path(folder)
    merges, _ = clip_merges_and_vocab()
    write_vocab_files(folder, merges)
    special = {
        "bos_token": {"content": BOS, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
        "eos_token": {"content": EOS, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
        "pad_token": pad_token,
        "unk_token": {"content": EOS, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "add_prefix_space": False,
        "bos_token": special["bos_token"],
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": special["eos_token"],
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": pad_token if pad_token != EOS else special["eos_token"],
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": special["unk_token"],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder
