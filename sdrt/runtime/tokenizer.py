"""CLIP tokenization at run time, with the ``tokenizers`` library alone (no torch, no transformers).

The engine directory's ``tokenizer/tokenizer.json`` is transformers' own CLIP backend tokenizer, serialized
at export (``sdrt.export.tokenizer``), so normalization, pre-tokenization, BPE and the bos/eos post-processor
are the very ones diffusers uses. What transformers adds in Python at call time - truncation to
``model_max_length`` and padding - is done here in numpy, because transformers does it by mutating the
shared backend tokenizer on every call, which is not safe when one pipeline serves many threads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer

from sdrt.errors import UserError

logger = logging.getLogger(__name__)

# The BPE model marks word ends with this suffix; transformers' CLIPTokenizer.decode turns it into a space.
END_OF_WORD_SUFFIX = "</w>"


class CLIPTokenizer:
    """Prompts -> the int64 ``input_ids`` diffusers' StableDiffusionPipeline feeds its text encoder.

    That is ``tokenizer(prompt, padding="max_length", max_length=model_max_length, truncation=True)``:
    bos, the prompt's tokens, eos, then ``pad_token_id`` up to ``max_length``. An over-long prompt keeps bos,
    its first ``max_length - 2`` tokens and eos, and the removed part is logged as diffusers logs it.

    Immutable after construction: ``encode`` may be called from many threads at once.
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int, pad_token_id: int, *, copy: bool = True):
        if int(max_length) < 2:
            raise UserError(f"tokenizer max_length {max_length} is too small: it must hold bos and eos (>= 2)")
        # Our own instance, without padding or truncation: every call sees the full encoding, so over-long
        # prompts can be reported, and no call changes state another thread reads. ``copy=False`` hands
        # over a tokenizer nobody else holds (from_dir), saving a second parse of the 3.6 MB JSON.
        self._tokenizer = Tokenizer.from_str(tokenizer.to_str()) if copy else tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.max_length = int(max_length)
        self.pad_token_id = int(pad_token_id)
        # bos and eos come from the post-processor itself rather than from names, so a checkpoint with other
        # special tokens still works: the empty prompt encodes to exactly [bos, eos].
        empty = self._tokenizer.encode("").ids
        if len(empty) != 2:
            raise UserError(f"tokenizer.json does not add bos and eos (the empty prompt encodes to {empty})")
        self.bos_token_id, self.eos_token_id = empty

    @classmethod
    def from_dir(cls, path: str | Path, max_length: int, pad_token_id: int) -> "CLIPTokenizer":
        """Load ``path/tokenizer.json`` (as written by ``sdrt export``); numbers come from the manifest."""
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise UserError(f"{file} is missing: the engine directory is incomplete; re-run `sdrt export`")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise UserError(f"{file} is not a valid tokenizers file: {exc}") from exc
        return cls(tokenizer, max_length=max_length, pad_token_id=pad_token_id, copy=False)

    def encode(self, prompts: Sequence[str] | str) -> np.ndarray:
        """Token ids, int64 ``[len(prompts), max_length]``; a single string counts as one prompt."""
        ids, removed = self.encode_with_removed(prompts)
        removed = [text for text in removed if text is not None]
        if removed:
            logger.warning(
                "The following part of your input was truncated because CLIP can only handle sequences up to"
                f" {self.max_length} tokens: {removed}"
            )
        return ids

    def encode_with_removed(self, prompts: Sequence[str] | str) -> tuple[np.ndarray, list[str | None]]:
        """``encode`` without logging: the ids and, per prompt, the truncated-away text (None if it fit)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise TypeError(f"prompts must be strings, got {type(prompt).__name__}: {prompt!r}")
        ids = np.full((len(prompts), self.max_length), self.pad_token_id, dtype=np.int64)
        removed: list[str | None] = [None] * len(prompts)
        for row, encoding in enumerate(self._tokenizer.encode_batch(prompts)):
            tokens = encoding.ids
            if len(tokens) > self.max_length:
                # transformers truncates the prompt's tokens, then the post-processor adds bos and eos;
                # diffusers names the removed part as the untruncated ids from max_length - 1 to before eos.
                removed[row] = self.decode(tokens[self.max_length - 1 : -1])
                tokens = tokens[: self.max_length - 1] + [tokens[-1]]
            ids[row, : len(tokens)] = tokens
        return ids, removed

    def pieces(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids without bos, eos or padding, however long (prompt chunking cuts them)."""
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def token_id(self, token: str) -> int | None:
        """The id of a vocabulary entry (e.g. ``",</w>"``) or of an added token; None if there is none."""
        return self._tokenizer.token_to_id(token)

    def with_added_tokens(self, tokens: Sequence[str]) -> tuple["CLIPTokenizer", list[int]]:
        """A copy that also knows ``tokens`` (textual-inversion names), and their ids.

        As transformers' ``add_tokens`` adds them for diffusers' ``load_textual_inversion``: plain added tokens
        matched in the normalized (lower-cased) prompt, anywhere in it, numbered after the vocabulary.
        """
        tokens = list(tokens)
        for i, token in enumerate(tokens):
            if self._tokenizer.token_to_id(token) is not None or token in tokens[:i]:
                raise UserError(f"token {token!r} is already in the tokenizer's vocabulary or taken by another "
                                f"embedding; give the embedding another token (FILE:TOKEN)")
        copy = CLIPTokenizer(self._tokenizer, self.max_length, self.pad_token_id)
        copy._tokenizer.add_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=True,
                                               special=False) for t in tokens])
        return copy, [copy._tokenizer.token_to_id(t) for t in tokens]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` as transformers' CLIPTokenizer.decode gives it (used to name truncated text)."""
        text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
        return text.replace(END_OF_WORD_SUFFIX, " ").strip()
