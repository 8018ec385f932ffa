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

N_MERGES = 49152 - 256 - 2  # as in CLIP's SimpleTokenizer: 48894
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bpe_vocab_path() -> Path:
    spec = importlib.util.find_spec("clip")  # locate without importing (clip's __init__ needs pkg_resources)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("clip-anytorch is not installed: pip install --no-deps clip-anytorch")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the clip-anytorch install")
    return path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def clip_merges_and_vocab() -> tuple[list[str], dict[str, int]]:
    lines = gzip.open(bpe_vocab_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)
    return merges, vocab


def write_clip_tokenizer(folder: str | Path, pad_token: str = EOS, model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json as SD checkpoints do.

    SD1.x pads with ``<|endoftext|>``; SD2.x with ``"!"`` (id 0).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges, vocab = clip_merges_and_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
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
