"""export_tokenizer on the tiny checkpoints the other export tests use (pad token read, not assumed)."""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.runtime.tokenizer import CLIPTokenizer


@pytest.mark.parametrize("kind, pad_token", [("sd1-tiny", "<|endoftext|>"), ("sd2-tiny", "!")])
def test_export_tiny_checkpoint(model_dirs, tmp_path, kind, pad_token):
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    from sdrt.export.tokenizer import export_tokenizer

    numbers = export_tokenizer(model_dirs[kind], tmp_path / "tokenizer")
    assert numbers["pad_token"] == pad_token
    reference = HFCLIPTokenizer.from_pretrained(str(model_dirs[kind] / "tokenizer"))
    runtime = CLIPTokenizer.from_dir(tmp_path / "tokenizer", numbers["max_length"], numbers["pad_token_id"])
    prompts = ["a photo of an astronaut riding a horse on mars", "Hello, World!!"]
    want = reference(prompts, padding="max_length", max_length=reference.model_max_length, truncation=True).input_ids
    np.testing.assert_array_equal(runtime.encode(prompts), np.asarray(want))
