"""Runtime CLIP tokenizer: ids equal to transformers' CLIPTokenizer as diffusers calls it, without torch."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from sdrt.errors import UserError
from sdrt.runtime.tokenizer import CLIPTokenizer
from tools.clip_vocab import EOS, write_clip_tokenizer
from tools.prompt_corpus import prompt_corpus

ROOT = Path(__file__).resolve().parents[2]
PADS = {"sd1": EOS, "sd2": "!"}


@pytest.fixture(scope="module", params=sorted(PADS))
def exported(request, tmp_path_factory):
    """(transformers reference, runtime tokenizer, manifest numbers) for one SD flavour."""
    pytest.importorskip("transformers")
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    from sdrt.export.tokenizer import export_tokenizer

    model_dir = tmp_path_factory.mktemp(request.param)
    write_clip_tokenizer(model_dir / "tokenizer", pad_token=PADS[request.param])
    engine_tokenizer = model_dir / "engine" / "tokenizer"
    numbers = export_tokenizer(model_dir, engine_tokenizer)
    reference = HFCLIPTokenizer.from_pretrained(str(model_dir / "tokenizer"))
    runtime = CLIPTokenizer.from_dir(engine_tokenizer, numbers["max_length"], numbers["pad_token_id"])
    return reference, runtime, numbers


def diffusers_ids(reference, prompts: list[str]) -> np.ndarray:
    """What StableDiffusionPipeline.encode_prompt feeds the text encoder (numpy instead of torch)."""
    return np.asarray(
        reference(prompts, padding="max_length", max_length=reference.model_max_length, truncation=True).input_ids,
        dtype=np.int64,
    )


def test_manifest_numbers(exported):
    reference, runtime, numbers = exported
    assert numbers == {
        "max_length": 77,
        "pad_token": reference.pad_token,
        "pad_token_id": reference.pad_token_id,
        "bos_token_id": reference.bos_token_id,
        "eos_token_id": reference.eos_token_id,
    }
    assert numbers["pad_token_id"] == (49407 if numbers["pad_token"] == EOS else 0)
    assert (runtime.bos_token_id, runtime.eos_token_id) == (numbers["bos_token_id"], numbers["eos_token_id"])


def test_export_copies_checkpoint_files(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "tok"
    from sdrt.export.tokenizer import export_tokenizer

    write_clip_tokenizer(tmp_path / "model" / "tokenizer")
    export_tokenizer(tmp_path / "model", out)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tmp_path / "model" / "tokenizer" / name).read_bytes()
    assert (out / "tokenizer.json").is_file()
    assert not list(out.glob("*.tmp"))


def test_corpus_equals_transformers(exported, caplog):
    reference, runtime, _ = exported
    prompts = prompt_corpus(1200, seed=0)
    assert len(prompts) >= 1000
    with caplog.at_level(logging.ERROR, logger="sdrt.runtime.tokenizer"):  # the corpus has over-long prompts
        got = runtime.encode(prompts)
    want = diffusers_ids(reference, prompts)
    assert got.dtype == np.int64 and got.shape == (len(prompts), 77)
    mismatched = [p for p, a, b in zip(prompts, got, want) if not np.array_equal(a, b)]
    assert not mismatched, f"{len(mismatched)} prompts differ, first: {mismatched[0]!r}"


def test_corpus_other_seed_single_prompts(exported, caplog):
    """One prompt per call (the CLI's common case) gives the same rows as a batch."""
    reference, runtime, _ = exported
    prompts = prompt_corpus(60, seed=7)[-40:]
    with caplog.at_level(logging.ERROR, logger="sdrt.runtime.tokenizer"):
        for prompt in prompts:
            np.testing.assert_array_equal(runtime.encode([prompt]), diffusers_ids(reference, [prompt]), err_msg=prompt)
            np.testing.assert_array_equal(runtime.encode(prompt), runtime.encode([prompt]))


def test_layout_bos_tokens_eos_pad(exported):
    _, runtime, numbers = exported
    row = runtime.encode(["a cat"])[0]
    assert row[0] == numbers["bos_token_id"]
    assert row[3] == numbers["eos_token_id"]
    assert (row[4:] == numbers["pad_token_id"]).all()
    empty = runtime.encode([""])[0]
    assert list(empty[:2]) == [numbers["bos_token_id"], numbers["eos_token_id"]]
    assert runtime.encode([]).shape == (0, 77)


def test_truncation_warning_names_removed_text(exported, caplog):
    reference, runtime, _ = exported
    fits = "a " * 74 + "a"  # 75 tokens + bos + eos = 77: no warning
    with caplog.at_level(logging.WARNING, logger="sdrt.runtime.tokenizer"):
        runtime.encode([fits, "short"])
    assert not caplog.records

    long = " ".join(f"w{i}" for i in range(100))
    with caplog.at_level(logging.WARNING, logger="sdrt.runtime.tokenizer"):
        ids = runtime.encode([long, "short"])
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "truncated because CLIP can only handle sequences up to 77 tokens" in message
    # diffusers decodes the untruncated ids from max_length - 1 up to (not including) eos.
    untruncated = reference([long]).input_ids[0]
    removed = reference.batch_decode([untruncated[76:-1]])
    assert message.endswith(f": {removed}")
    assert ids[0, -1] == runtime.eos_token_id
    np.testing.assert_array_equal(ids[:1], diffusers_ids(reference, [long]))


def test_thread_safe(exported, caplog):
    _, runtime, _ = exported
    prompts = prompt_corpus(200, seed=3)
    with caplog.at_level(logging.ERROR, logger="sdrt.runtime.tokenizer"):
        expected = runtime.encode(prompts)
        results, errors = {}, []

        def work(k: int):
            try:
                chunk = prompts[k::8]
                for _ in range(3):
                    results[k] = runtime.encode(chunk)
            except Exception as exc:  # surfaced by the assert below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    for k in range(8):
        np.testing.assert_array_equal(results[k], expected[k::8])


def test_constructor_copies_and_clears_caller_tokenizer(exported):
    _, runtime, numbers = exported
    from tokenizers import Tokenizer

    theirs = Tokenizer.from_str(runtime._tokenizer.to_str())
    theirs.enable_truncation(5)
    ours = CLIPTokenizer(theirs, numbers["max_length"], numbers["pad_token_id"])
    assert theirs.truncation is not None  # the caller's object is left alone
    long = " ".join(["cat"] * 20)
    np.testing.assert_array_equal(ours.encode([long]), runtime.encode([long]))


def test_rejects_non_strings(exported):
    _, runtime, _ = exported
    with pytest.raises(TypeError, match="strings"):
        runtime.encode(["ok", None])


def test_missing_tokenizer_folder_is_user_error(tmp_path):
    pytest.importorskip("transformers")
    from sdrt.export.tokenizer import export_tokenizer

    with pytest.raises(UserError, match="tokenizer"):
        export_tokenizer(tmp_path, tmp_path / "out")


def test_missing_tokenizer_json_is_user_error(tmp_path):
    with pytest.raises(UserError, match="tokenizer.json"):
        CLIPTokenizer.from_dir(tmp_path, 77, 49407)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer.json"):
        CLIPTokenizer.from_dir(tmp_path, 77, 49407)


def test_runtime_import_leaves_out_torch_and_transformers():
    code = (
        "import sys, sdrt.runtime.tokenizer\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
