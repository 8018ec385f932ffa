"""A run's mode in one word, and back: precision, feature caching, VAE decoder (``fp32``, ``bf16+cache3``,
``fp32+cache3+tiny-vae``). `sdrt generate` prints it, `sdrt bench` reports it and takes it (``--compare-mode``)."""

from __future__ import annotations

import re

from sdrt.errors import UserError
from sdrt.runtime.precision import PRECISIONS

_CACHE = re.compile(r"cache(\d+)")
# Modes that cost more than 5 points of the shapes model's accuracy against fp32 (benchmarks/quality.py,
# RESULTS.md "CPU fast modes") run, but with a warning: not offered as-is. Caching every 3 or more UNet
# evaluations did (8.9 points at 3), and caching with the tiny VAE decoder (6.7 points at 2).
OFFERED_CACHE_INTERVAL = 2


def unoffered(cache_interval: int | None, vae: str) -> str | None:
    """Why a mode is not offered as-is (one line), or None."""
    if cache_interval is not None and cache_interval > OFFERED_CACHE_INTERVAL:
        return (f"cache_interval {cache_interval}: intervals above {OFFERED_CACHE_INTERVAL} cost more than 5 points of "
                "accuracy against fp32 in sdrt's quality benchmark (benchmarks/RESULTS.md); check the pictures")
    if cache_interval is not None and cache_interval > 1 and vae == "tiny":
        return (f"cache_interval {cache_interval} with vae 'tiny': the two together cost more than 5 points of "
                "accuracy against fp32 in sdrt's quality benchmark (benchmarks/RESULTS.md); check the pictures")
    return None


def mode_name(precision: str = "fp32", cache_interval: int | None = None, vae: str = "full") -> str:
    return precision + (f"+cache{cache_interval}" if cache_interval is not None else "") + \
        ("+tiny-vae" if vae == "tiny" else "")


def parse_mode(text: str) -> dict:
    """``mode_name``'s words -> Pipeline's arguments (precision, cache_interval, vae); fp32, full VAE and no
    caching where a word is left out."""
    mode = {"precision": "fp32", "cache_interval": None, "vae": "full"}
    for word in str(text).split("+"):
        cache = _CACHE.fullmatch(word)
        if word in PRECISIONS:
            mode["precision"] = word
        elif cache and int(cache.group(1)) >= 1:
            mode["cache_interval"] = int(cache.group(1))
        elif word in ("tiny-vae", "full-vae"):
            mode["vae"] = word.split("-")[0]
        else:
            raise UserError(f"mode {text!r}: {word!r} is not a mode word; join with '+' any of "
                            f"{', '.join(PRECISIONS)}, cacheN (N >= 1), tiny-vae (e.g. bf16+cache3+tiny-vae)")
    return mode
