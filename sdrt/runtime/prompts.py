"""Prompts as AUTOMATIC1111's web UI reads them: emphasis weights, BREAK, and chunks of 75 tokens.

CLIP reads ``max_length`` tokens (77): bos, 75 of the prompt, eos. A longer prompt is cut into chunks of
``max_length - 2`` tokens, each encoded on its own with its own bos, eos and padding, and the hidden states
are concatenated, so the UNet's cross-attention reads ``max_length * k`` tokens. Every prompt of a request
(negative prompts too) is padded with empty chunks to the same ``k``. Up to 75 tokens a prompt is one chunk
laid out exactly as diffusers tokenizes it, so its hidden states are the ones diffusers computes.

Emphasis (that tool's "Original" mode): ``(text)`` x1.1, ``[text]`` /1.1, ``(text:1.3)``, nested brackets
multiply, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters, ``BREAK`` ends the chunk. A token's hidden
state is multiplied by its weight, then the chunk is rescaled so that its mean is what it was unweighted.

Three steps, so that a caller may encode the prompts of several requests in one text-encoder call:

(a) :meth:`PromptReader.prepare` (pure): prompts -> :class:`PromptTokens`, ids ``[n_prompts * k, max_length]``
    and per-token weights;
(b) the text encoder over ``tokens.ids`` (rows of several requests may be concatenated);
(c) :meth:`PromptTokens.assemble` of those rows -> ``[n_prompts, max_length * k, hidden]``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from sdrt.errors import StageError, UserError
from sdrt.runtime.tokenizer import END_OF_WORD_SUFFIX, CLIPTokenizer

logger = logging.getLogger(__name__)

ROUND_BRACKET = 1.1
SQUARE_BRACKET = 1 / 1.1
# AUTOMATIC1111's default "prompt word wrap length limit": when a chunk fills up and its last comma is at
# most this many tokens back, the text after that comma moves to the next chunk.
WORD_WRAP = 20

# That tool's tokens, in its order: escapes, brackets, ":weight)", text without special characters, a lone ":".
_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str | None, float]]:
    """``text`` as (text, weight) runs, neighbours of equal weight merged; ``(None, 1.0)`` marks a BREAK.

    AUTOMATIC1111's ``parse_prompt_attention``, except that a BREAK inside brackets still breaks (that tool
    multiplies its marker and then reads it as the word "BREAK").

    >>> parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")[:3]
    [('a ', 1.0), ('house', 1.5730000000000004), (' ', 1.1)]
    """
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for item in res[start:]:
            if item[0] is not None:
                item[1] *= multiplier

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_brackets.append(len(res))
        elif piece == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), _weight(weight, piece))
        elif piece == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_BRACKET)
        elif piece == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_BRACKET)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i > 0:
                    res.append([None, 1.0])
                res.append([part, 1.0])
    for pos in round_brackets:  # unclosed brackets weigh to the end
        multiply_range(pos, ROUND_BRACKET)
    for pos in square_brackets:
        multiply_range(pos, SQUARE_BRACKET)
    if not res:
        res = [["", 1.0]]
    merged = [res[0]]
    for item in res[1:]:
        last = merged[-1]
        if item[0] is not None and last[0] is not None and item[1] == last[1]:
            last[0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]


def _weight(number: str, piece: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise UserError(f"prompt weight {number!r} in {piece!r} is not a number; write it as (text:1.3)") from None


@dataclass(frozen=True)
class PromptTokens:
    """One request's prompts, read and chunked: the text encoder's input and what reassembly needs.

    Prompt ``i``'s chunk ``j`` is row ``i * chunks + j`` of ``ids`` and ``weights``.
    """

    ids: np.ndarray       # int64 [n_prompts * chunks, max_length]: bos, tokens, eos, padding
    weights: np.ndarray   # float32, same shape: 1 for bos, eos and padding
    chunks: int           # every prompt has this many (shorter ones padded with empty chunks)

    @property
    def n_prompts(self) -> int:
        return len(self.ids) // self.chunks

    @property
    def first_chunks(self) -> np.ndarray:
        """Each prompt's first row: where a pooled embedding comes from (AUTOMATIC1111 pools the first chunk)."""
        return np.arange(self.n_prompts) * self.chunks

    def assemble(self, hidden: np.ndarray) -> np.ndarray:
        """The text encoder's ``last_hidden_state`` of ``ids`` -> ``[n_prompts, max_length * chunks, hidden]``.

        Weighted chunks: hidden states times their tokens' weights, rescaled to the chunk's unweighted mean
        (AUTOMATIC1111's "Original" emphasis, per prompt and chunk); other chunks are left untouched.
        """
        rows, length = self.ids.shape
        if hidden.ndim != 3 or hidden.shape[:2] != (rows, length):
            raise ValueError(f"hidden states of shape {hidden.shape} for token ids of shape {self.ids.shape}")
        weighted = np.flatnonzero((self.weights != 1).any(axis=1))
        if len(weighted):
            hidden = hidden.copy()
            for row in weighted:
                z = hidden[row].astype(np.float64)
                original = z.mean()
                z *= self.weights[row, :, None]
                weighted_mean = z.mean()
                if not weighted_mean:
                    raise StageError("prompt weighting: a weighted chunk's mean came out 0, so its mean cannot be "
                                     "restored; change the weights")
                hidden[row] = z * (original / weighted_mean)
        return hidden.reshape(self.n_prompts, self.chunks * length, hidden.shape[-1])


class PromptReader:
    """Prompt text -> :class:`PromptTokens` with a model's tokenizer (step (a) above; pure, thread-safe).

    ``vectors`` maps a textual-inversion token's id to the ids of its vectors (sdrt.runtime.embeddings): the
    token stands for all of them, and they are kept in one chunk, as AUTOMATIC1111 keeps an embedding whole.
    """

    def __init__(self, tokenizer: CLIPTokenizer, vectors: Mapping[int, Sequence[int]] | None = None,
                 word_wrap: int = WORD_WRAP):
        self.tokenizer = tokenizer
        self.chunk_length = tokenizer.max_length - 2
        self.vectors = {int(k): tuple(v) for k, v in (vectors or {}).items()}
        self.comma_id = tokenizer.token_id("," + END_OF_WORD_SUFFIX)
        self.word_wrap = word_wrap

    def chunks(self, prompt: str, weighting: bool = True, wrap: bool = True) -> list[tuple[list[int], list[float]]]:
        """The prompt's chunks: (token ids, weights), at most ``chunk_length`` each, no bos/eos/padding.

        AUTOMATIC1111's ``tokenize_line``: each weighted run is tokenized on its own; a chunk closes when full
        (with ``wrap``, moving the text after a comma at most ``word_wrap`` tokens back into the next one), at
        a BREAK, or before an embedding that would not fit whole.
        """
        parts = parse_prompt_attention(prompt) if weighting else [(prompt, 1.0)]
        pieces = iter(self.tokenizer.pieces([text for text, _ in parts if text is not None]))
        size = self.chunk_length
        word_wrap = self.word_wrap if wrap else 0
        done: list[tuple[list[int], list[float]]] = []
        tokens: list[int] = []
        weights: list[float] = []
        last_comma = -1

        def close() -> None:
            nonlocal tokens, weights, last_comma
            done.append((tokens, weights))
            tokens, weights, last_comma = [], [], -1

        for text, weight in parts:
            if text is None:
                close()
                continue
            for token in next(pieces):
                if token == self.comma_id:
                    last_comma = len(tokens)
                elif word_wrap and len(tokens) == size and last_comma != -1 and len(tokens) - last_comma <= word_wrap:
                    cut = last_comma + 1
                    moved = tokens[cut:], weights[cut:]
                    tokens, weights = tokens[:cut], weights[:cut]
                    close()
                    tokens, weights = moved
                if len(tokens) == size:
                    close()
                group = self.vectors.get(token, (token,))
                if len(tokens) + len(group) > size:
                    close()
                tokens += group
                weights += [weight] * len(group)
        if tokens or not done:
            close()
        return done

    def prepare(self, prompts: Sequence[str], *, truncate: bool = False, weighting: bool = True,
                max_chunks: int | None = None, limit: str = "") -> PromptTokens:
        """Read ``prompts`` (a request's positives, then negatives) into one :class:`PromptTokens`.

        ``truncate``: keep each prompt's first 75 tokens (diffusers' cut: no word wrap), logging what is cut.
        ``weighting``: parse the emphasis syntax (otherwise the text is read literally, as diffusers does).
        ``max_chunks``: the most chunks the engine takes; a longer prompt is a UserError naming ``limit``.
        """
        if not prompts:
            raise ValueError("no prompts to read")
        read = [self.chunks(p, weighting, wrap=not truncate) for p in prompts]
        if truncate:
            for prompt, chunks in zip(prompts, read):
                if len(chunks) > 1:
                    cut = self.tokenizer.decode([t for ids, _ in chunks[1:] for t in ids])
                    logger.warning(f"The following part of your input was truncated because CLIP can only handle "
                                   f"sequences up to {self.tokenizer.max_length} tokens: [{cut!r}]")
            read = [chunks[:1] for chunks in read]
        k = max(len(chunks) for chunks in read)
        if max_chunks is not None and k > max_chunks:
            prompt, chunks = max(zip(prompts, read), key=lambda pc: len(pc[1]))
            count = sum(len(ids) for ids, _ in chunks)
            start = prompt if len(prompt) <= 40 else prompt[:40] + "..."
            raise UserError(
                f"the prompt {start!r} is {count} tokens in {k} chunks of {self.chunk_length}; this engine takes at "
                f"most {max_chunks} chunk{'s' if max_chunks > 1 else ''} ({max_chunks * self.chunk_length} tokens"
                f"{'; ' + limit if limit else ''}): shorten it, or truncate it (--truncate)")
        tok = self.tokenizer
        ids = np.full((len(read) * k, tok.max_length), tok.pad_token_id, dtype=np.int64)
        weights = np.ones(ids.shape, dtype=np.float32)
        ids[:, 0] = tok.bos_token_id
        for i, chunks in enumerate(read):
            for j in range(k):
                chunk, chunk_weights = chunks[j] if j < len(chunks) else ([], [])
                row = i * k + j
                ids[row, 1:1 + len(chunk)] = chunk
                ids[row, 1 + len(chunk)] = tok.eos_token_id
                weights[row, 1:1 + len(chunk)] = chunk_weights
        return PromptTokens(ids, weights, k)
