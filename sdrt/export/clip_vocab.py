"""The CLIP BPE vocabulary, as SD checkpoints ship it in ``tokenizer/`` (vocab.json, merges.txt), derived from
the merge list exactly as OpenAI's SimpleTokenizer and transformers derive it: the 256 byte characters, the same
with ``</w>``, one entry per merge (48894), then ``<|startoftext|>`` and ``<|endoftext|>``: 49408 ids.

sdrt ships the merge list (``configs/clip_merges.txt.gz``, made by ``tools/clip_vocab.py`` from the
``clip-anytorch`` wheel) so that single-file checkpoints, which carry no tokenizer, export offline.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # as in CLIP's SimpleTokenizer: 48894
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SHIPPED_MERGES = Path(__file__).resolve().parent / "configs" / "clip_merges.txt.gz"


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


def vocab_from_merges(merges: list[str]) -> dict[str, int]:
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)
    return vocab


def shipped_merges() -> list[str]:
    lines = gzip.open(SHIPPED_MERGES).read().decode("utf-8").split("\n")
    return lines[1: N_MERGES + 1]  # after the "#version" line


def write_vocab_files(folder: str | Path, merges: list[str]) -> None:
    """vocab.json and merges.txt, as released SD checkpoints have them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab_from_merges(merges), ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
