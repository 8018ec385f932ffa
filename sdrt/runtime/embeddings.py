"""Textual-inversion embeddings, added at run time: new tokens in the tokenizer and new rows in the text
encoder's token-embedding table, handed to the backend as an initializer override when the text encoder
loads (the ONNX files are not touched, nothing is re-exported).

Files are ``.safetensors`` holding one tensor, ``[hidden]`` or ``[n, hidden]``: as diffusers' textual-inversion
training writes them (named after the token, ``{"<cat-toy>": ...}``) and as AUTOMATIC1111 reads them (any
name, e.g. ``emb_params``). The token is the one given (``FILE:TOKEN``), else the file's stem, as AUTOMATIC1111
names embeddings. An n-vector embedding becomes the tokens ``TOKEN, TOKEN_1, ..., TOKEN_{n-1}``, as diffusers'
``load_textual_inversion`` adds them; TOKEN in a prompt stands for all n vectors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from sdrt.errors import UserError
from sdrt.runtime.tokenizer import CLIPTokenizer

MAX_FILE_BYTES = 64 * 2**20  # an embedding is a few vectors: anything larger is another kind of file
PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt", ".pth")
_SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}


@dataclass(frozen=True)
class Embedding:
    token: str
    vectors: np.ndarray   # float32 [n, hidden]
    source: Path

    @property
    def tokens(self) -> list[str]:
        """The tokenizer entries it adds, one per vector (diffusers' names)."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, len(self.vectors))]


def parse_embedding_arg(text: str | os.PathLike) -> tuple[Path, str | None]:
    """``FILE[:TOKEN]`` -> (file, token or None); a path that exists as given is never split."""
    text = os.fspath(text)
    if ":" in text and not Path(text).exists():
        path, token = text.rsplit(":", 1)
        if not token.strip() or any(c.isspace() for c in token):
            raise UserError(f"--embedding {text!r}: TOKEN {token!r} must be one word without spaces")
        return Path(path), token
    return Path(text), None


def load_embedding(spec: str | os.PathLike | tuple) -> Embedding:
    """An embedding from ``FILE[:TOKEN]`` (or a ``(file, token)`` pair)."""
    path, token = (Path(spec[0]), spec[1]) if isinstance(spec, tuple) else parse_embedding_arg(spec)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{path}: pickle-based embeddings ({path.suffix}) can run code and need torch; convert it to "
                        f".safetensors (one tensor [n, hidden])")
    tensors = read_safetensors(path)
    if {"clip_l", "clip_g"} <= set(tensors):
        raise UserError(f"{path}: an SDXL embedding (clip_l and clip_g); this model has one text encoder")
    if len(tensors) != 1:
        raise UserError(f"{path}: holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:4])}); a textual-inversion "
                        f"embedding holds one, [n, hidden]")
    (vectors,) = tensors.values()
    vectors = vectors.reshape(1, -1) if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or not vectors.size:
        raise UserError(f"{path}: a tensor of shape {list(vectors.shape)}; an embedding is [hidden] or [n, hidden]")
    if not np.isfinite(vectors).all():
        raise UserError(f"{path}: the embedding holds NaN or inf")
    return Embedding(token or path.stem, vectors.astype(np.float32), path)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The float tensors of a small ``.safetensors`` file (8-byte header length, JSON header, raw data)."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise UserError(f"{path}: {size / 2**20:.0f} MB is not a textual-inversion embedding (a few KB)")
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except OSError as e:
        raise UserError(f"{path}: cannot read the embedding ({e.strerror or e})") from None
    except ValueError as e:
        raise UserError(f"{path}: not a .safetensors file ({e})") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: malformed entry {name!r} in the .safetensors header") from None
        raw = data[8 + n + begin: 8 + n + end]
        if dtype == "BF16":
            values = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype in _SAFETENSORS_DTYPES:
            values = np.frombuffer(raw, _SAFETENSORS_DTYPES[dtype]).astype(np.float32)
        else:
            raise UserError(f"{path}: tensor {name!r} is {dtype}; an embedding is F32, F16 or BF16")
        if values.size != int(np.prod(shape, dtype=np.int64)):
            raise UserError(f"{path}: tensor {name!r} is truncated")
        out[name] = values.reshape(shape)
    return out


def add_embeddings(manifest, tokenizer: CLIPTokenizer, embeddings: Sequence[Embedding]
                   ) -> tuple[CLIPTokenizer, dict[str, np.ndarray], dict[int, tuple[int, ...]]]:
    """The tokenizer with the embeddings' tokens, the text encoder's initializer overrides, and each
    embedding's token id -> the ids of its vectors (for sdrt.runtime.prompts.PromptReader)."""
    record = manifest.component("text_encoder").get("token_embedding")
    if not record:
        raise UserError(f"{manifest.engine_dir}: the manifest does not say which initializer is the text encoder's "
                        f"token-embedding table (exported by an older sdrt); re-export it to use embeddings")
    from sdrt.runtime.onnx_weights import graph_initializers

    graph = manifest.graph_path("text_encoder")
    found = graph_initializers(graph).get(record["initializer"])
    if found is None or list(found.shape) != list(record["shape"]):
        raise UserError(f"{graph}: has no initializer {record['initializer']!r} of shape {record['shape']} "
                        f"(corrupt engine directory)")
    table = found.read()
    rows, hidden = table.shape
    for e in embeddings:
        if e.vectors.shape[1] != hidden:
            raise UserError(f"{e.source}: vectors of width {e.vectors.shape[1]}; this model's text encoder takes "
                            f"{hidden} (an embedding made for another model)")
        if len(e.vectors) > tokenizer.max_length - 2:
            raise UserError(f"{e.source}: {len(e.vectors)} vectors do not fit in one prompt chunk "
                            f"({tokenizer.max_length - 2} tokens)")
    names = [t for e in embeddings for t in e.tokens]
    tokenizer, ids = tokenizer.with_added_tokens(names)
    grown = np.zeros((max(rows, max(ids) + 1), hidden), dtype=table.dtype)
    grown[:rows] = table
    groups = {}
    at = 0
    for e in embeddings:
        group = tuple(ids[at:at + len(e.vectors)])
        grown[list(group)] = e.vectors
        groups[group[0]] = group
        at += len(group)
    return tokenizer, {record["initializer"]: grown}, groups
