"""A seeded corpus of varied prompts for tokenizer parity tests.

Tokenizer bugs hide in the corners (normalization of whitespace and unicode, the pre-tokenizer's letter /
digit / punctuation classes, contractions, byte fallback for emoji, truncation at exactly the boundary), so
the corpus mixes ordinary SD prompts with those corners, plus a fixed list of edge cases that every run
includes whatever the seed.

    python -m tools.prompt_corpus [N] [--seed S]     # print N prompts as JSON lines
"""

from __future__ import annotations

import argparse
import json
import random

SUBJECTS = [
    "a photo of an astronaut riding a horse", "portrait of a woman", "a cat", "an old lighthouse",
    "cyberpunk city street", "a bowl of ramen", "mountain landscape", "dragon", "robot", "castle in the clouds",
]
STYLES = [
    "highly detailed", "8k", "trending on artstation", "by greg rutkowski", "oil painting", "octane render",
    "cinematic lighting", "(masterpiece:1.2)", "[bokeh]", "{sharp focus}", "Unreal Engine 5", "f/1.8, 85mm",
]
UNICODE_WORDS = [
    "café", "naïve", "Über", "crème brûlée", "façade", "piñata", "Ærøskøbing", "straße", "İstanbul", "ﬁne",
    "東京タワー", "日本の桜", "北京", "서울의 밤", "Москва", "αβγ δέλτα", "עברית", "العربية", "हिन्दी", "ไทย",
    "e\u0301", "A\u030a", "\u00c5", "\u212b",  # combining marks vs precomposed: NFC must agree
]
EMOJI = ["🐱", "🐱‍👤", "👩🏽‍🚀", "🇯🇵", "✨", "❤️", "🔥🔥🔥", "🤖", "🌸", "😀😃😄"]
PUNCTUATION = ["!", "!!", "!!!", "?!", "...", "…", "--", "—", ";", ":", "(", ")", "[", "]", "{", "}", "<", ">",
               "\"", "'", "`", "@", "#", "$%^&*", "_", "|", "/\\", "~", "+=", "«»", "„“", "¿¡"]
CONTRACTIONS = ["it's", "don't", "we're", "they've", "I'm", "you'll", "he'd", "IT'S", "Won'T", "o'clock",
                "rock'n'roll", "dogs'", "'quoted'", "’curly’"]
NUMBERS = ["0", "42", "3.14159", "1,000,000", "1920x1080", "2024", "-7", "1e10", "½", "²", "٣", "०१२", "Ⅻ"]
WHITESPACE = [" ", "  ", "\t", "\n", " \t\n ", "\r\n", "\u00a0", "\u3000", "\u2003", "\u200b", "    "]
SPECIAL_TEXT = ["<|startoftext|>", "<|endoftext|>", "<|endoftext|><|endoftext|>", "<|endof text|>", "<|foo|>"]
LONG_WORDS = ["supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis",
              "a" * 300, "ab" * 150, "x" * 1000, "草" * 120]

EDGE_CASES = [
    "", " ", "\t", "\n\n\n", "!", "a", "A", ".", "'s", "<|endoftext|>", "<|startoftext|>",
    "a " * 74 + "a",       # 75 tokens: exactly fills max_length 77
    "a " * 75 + "a",       # 76 tokens: one over
    "a " * 76 + "a",
    "word " * 200,
    "🐱" * 80,
    "x" * 5000,
    "café " * 100,
]


def _ordinary(rng: random.Random) -> str:
    parts = [rng.choice(SUBJECTS)] + rng.sample(STYLES, rng.randint(0, 5))
    return ", ".join(parts)


def _mixed(rng: random.Random) -> str:
    pools = [SUBJECTS, STYLES, UNICODE_WORDS, EMOJI, PUNCTUATION, CONTRACTIONS, NUMBERS, SPECIAL_TEXT]
    pieces = []
    for _ in range(rng.randint(1, 12)):
        piece = rng.choice(rng.choice(pools))
        case = rng.random()
        piece = piece.upper() if case < 0.15 else piece.title() if case < 0.25 else piece
        pieces.append(piece)
        pieces.append(rng.choice(WHITESPACE) if rng.random() < 0.3 else rng.choice([" ", "", ", "]))
    return "".join(pieces)


def _random_chars(rng: random.Random) -> str:
    # Arbitrary code points, including controls and astral planes, but no lone surrogates (not valid str->UTF-8).
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x370, 0x3FF), (0x3040, 0x30FF), (0x4E00, 0x9FFF),
              (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0xE000, 0xF8FF), (0x10000, 0x1000F)]
    out = []
    for _ in range(rng.randint(1, 40)):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def _long(rng: random.Random) -> str:
    n = rng.randint(60, 160)  # words around and past 75 tokens
    return " ".join(rng.choice(SUBJECTS + STYLES + UNICODE_WORDS + CONTRACTIONS) for _ in range(n))


def _long_word(rng: random.Random) -> str:
    word = rng.choice(LONG_WORDS)
    return f"{_ordinary(rng)} {word}" if rng.random() < 0.5 else word


def prompt_corpus(n: int = 1200, seed: int = 0) -> list[str]:
    """``n`` prompts (at least the fixed edge cases), the same for the same ``seed``."""
    rng = random.Random(seed)
    makers = [(_ordinary, 3), (_mixed, 5), (_random_chars, 2), (_long, 2), (_long_word, 1)]
    choices = [maker for maker, weight in makers for _ in range(weight)]
    prompts = list(EDGE_CASES)
    while len(prompts) < n:
        prompts.append(rng.choice(choices)(rng))
    return prompts[: max(n, len(EDGE_CASES))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, nargs="?", default=1200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for prompt in prompt_corpus(args.n, args.seed):
        print(json.dumps(prompt, ensure_ascii=False))


if __name__ == "__main__":
    main()
