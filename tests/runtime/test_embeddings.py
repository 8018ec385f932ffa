"""Textual-inversion embeddings added at run time, against diffusers' ``load_textual_inversion``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sdrt.errors import UserError
from sdrt.runtime.embeddings import load_embedding, parse_embedding_arg, read_safetensors
from sdrt.runtime.images import images_psnr
from tests.conftest import assert_one_line_error, run_cli

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from sdrt.bench.reference import a1111_prompt_embeds, diffusers_pipeline, diffusers_scheduler  # noqa: E402

PROMPT = "a photo of <cat-toy> on a table"
NEGATIVE = "easyneg, blurry"
SETTINGS = dict(steps=4, guidance=7.5, seed=21, scheduler="euler")


def _vectors(ref, n, seed):
    """n random vectors of the size of the model's own token embeddings (a few times their spread)."""
    table = ref.text_encoder.get_input_embeddings().weight.detach()
    return torch.randn(n, table.shape[1], generator=torch.Generator().manual_seed(seed)) * table.std() * 3


@pytest.fixture(scope="module")
def embeddings(model_dirs, tmp_path_factory):
    """Per model: a 3-vector embedding as diffusers' training writes it (named after its token, f32) and a
    1-vector one as AUTOMATIC1111 users share them (kohya's ``emb_params``, f16, token = file name)."""
    out = {}
    for kind, model in model_dirs.items():
        ref = diffusers_pipeline(model)
        folder = tmp_path_factory.mktemp(kind)
        save_file({"<cat-toy>": _vectors(ref, 3, 1)}, folder / "learned_embeds.safetensors")
        save_file({"emb_params": _vectors(ref, 1, 2).half()}, folder / "easyneg.safetensors")
        out[kind] = [f"{folder / 'learned_embeds.safetensors'}:<cat-toy>", str(folder / "easyneg.safetensors")]
    return out


@pytest.fixture(scope="module")
def with_embeddings(engine_dirs, model_dirs, embeddings):
    """(sdrt Pipeline, diffusers pipeline) per model, both with the embeddings loaded."""
    from sdrt.runtime import Pipeline

    out = {}
    for kind in engine_dirs:
        ref = diffusers_pipeline(model_dirs[kind])
        for spec in embeddings[kind]:
            file, token = parse_embedding_arg(spec)
            ref.load_textual_inversion(str(file), token=token or file.stem)
        out[kind] = (Pipeline(engine_dirs[kind], embeddings=embeddings[kind]), ref)
    return out


def _diffusers_image(ref, prompt, negative, settings):
    ref.scheduler = diffusers_scheduler(settings["scheduler"], dict(ref.scheduler.config))
    image = ref(prompt, negative_prompt=negative, num_inference_steps=settings["steps"],
                guidance_scale=settings["guidance"], generator=torch.Generator("cpu").manual_seed(settings["seed"]),
                output_type="np").images[0]
    return (image * 255).round().astype(np.uint8)


@pytest.mark.parametrize("kind", ["sd1-tiny", "sd2-tiny"])
def test_embeddings_equal_diffusers_load_textual_inversion(with_embeddings, engine_dirs, kind):
    from sdrt.runtime import Pipeline

    pipe, ref = with_embeddings[kind]
    with torch.no_grad():
        cond, uncond = ref.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
    ours = pipe.encode_prompts([PROMPT, NEGATIVE])
    np.testing.assert_allclose(ours, torch.cat([cond, uncond]).numpy(), rtol=1e-5, atol=1e-5)
    image = pipe.generate(PROMPT, NEGATIVE, **SETTINGS).images[0]
    expected = _diffusers_image(ref, PROMPT, NEGATIVE, SETTINGS)
    without = Pipeline(engine_dirs[kind]).generate(PROMPT, NEGATIVE, **SETTINGS).images[0]
    psnr, psnr_without = images_psnr(image, expected), images_psnr(without, expected)
    print(f"{kind}: with embeddings vs diffusers {psnr:.1f} dB; without them {psnr_without:.1f} dB")
    assert psnr >= 40
    assert psnr_without < 35  # the embeddings matter: the comparison is not trivially equal


@pytest.mark.parametrize("kind", ["sd1-tiny", "sd2-tiny"])
def test_embeddings_in_long_weighted_prompts_follow_the_reference(with_embeddings, kind):
    pipe, ref = with_embeddings[kind]
    reader = pipe.prompt_reader
    # 73 words, then the 3-vector embedding: it does not fit in the first chunk whole, so it starts the second
    filler = " ".join(["red"] * (reader.chunk_length - 2))
    chunks = reader.chunks(f"{filler} (<cat-toy>:1.2) on a table")
    assert [len(ids) for ids, _ in chunks] == [reader.chunk_length - 2, 3 + 3]
    assert chunks[1][1][:3] == [pytest.approx(1.2)] * 3  # every vector carries the token's weight
    prompts = [f"{filler} (<cat-toy>:1.2) on a table BREAK a [cat-toy] <cat-toy>", "(easyneg:0.8)"]
    ours = pipe.encode_prompts(prompts)
    theirs = a1111_prompt_embeds(ref, prompts).numpy()
    assert ours.shape == theirs.shape and ours.shape[1] == 3 * pipe.model.text_max_length
    err = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    print(f"{kind}: long weighted prompt with embeddings vs torch reference: rel_l2 {err:.2e}")
    assert err <= 1e-5


def test_generate_cli_takes_embeddings(with_embeddings, engine_dirs, embeddings, tmp_path):
    from PIL import Image

    pipe, _ = with_embeddings["sd1-tiny"]
    args = [a for spec in embeddings["sd1-tiny"] for a in ("--embedding", spec)]
    r = run_cli("generate", engine_dirs["sd1-tiny"], PROMPT, "--negative-prompt", NEGATIVE, "--steps", 4,
                "--seed", 21, "--scheduler", "euler", "-o", tmp_path / "x.png", "-q", *args)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "x.png").convert("RGB")),
                                  pipe.generate(PROMPT, NEGATIVE, **SETTINGS).images[0])


def test_embedding_files_are_read_as_written(tmp_path):
    values = torch.randn(2, 8)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        save_file({"v": values.to(dtype)}, tmp_path / "e.safetensors")
        got = read_safetensors(tmp_path / "e.safetensors")["v"]
        np.testing.assert_array_equal(got, values.to(dtype).float().numpy())
    save_file({"emb_params": values[0]}, tmp_path / "one.safetensors")
    e = load_embedding(tmp_path / "one.safetensors")
    assert e.token == "one" and e.vectors.shape == (1, 8) and e.tokens == ["one"]
    e = load_embedding(f"{tmp_path / 'e.safetensors'}:<tok>")
    assert e.token == "<tok>" and e.tokens == ["<tok>", "<tok>_1"]


@pytest.mark.parametrize("tensors, suffix, needle", [
    ({"a": torch.zeros(1, 32), "b": torch.zeros(1, 32)}, ".safetensors", "holds 2 tensors (a, b)"),
    ({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 64)}, ".safetensors", "an SDXL embedding"),
    ({"emb_params": torch.zeros(2, 48)}, ".safetensors", "vectors of width 48; this model's text encoder takes 32"),
    ({"emb_params": torch.zeros(80, 32)}, ".safetensors", "80 vectors do not fit in one prompt chunk"),
    ({"emb_params": torch.full((1, 32), float("nan"))}, ".safetensors", "NaN"),
    ({"emb_params": torch.zeros(1, 32)}, ".pt", "pickle-based embeddings"),
])
def test_unusable_embedding_files_are_named(sd1_engine, tmp_path, tensors, suffix, needle):
    from sdrt.runtime import Pipeline

    path = tmp_path / f"e{suffix}"
    save_file(tensors, path)
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")) as e:
        Pipeline(sd1_engine, embeddings=[path])
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_token_clashes_and_missing_files_are_named(sd1_engine, tmp_path):
    from sdrt.runtime import Pipeline

    save_file({"emb_params": torch.zeros(1, 32)}, tmp_path / "e.safetensors")
    with pytest.raises(UserError, match="token '<|endoftext|>' is already in the tokenizer's vocabulary"):
        Pipeline(sd1_engine, embeddings=[f"{tmp_path / 'e.safetensors'}:<|endoftext|>"])
    with pytest.raises(UserError, match="token 'e' is already"):
        Pipeline(sd1_engine, embeddings=[tmp_path / "e.safetensors", tmp_path / "e.safetensors"])
    with pytest.raises(UserError, match="cannot read the embedding"):
        Pipeline(sd1_engine, embeddings=[tmp_path / "nothing.safetensors"])
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(UserError, match="not a .safetensors file"):
        Pipeline(sd1_engine, embeddings=[tmp_path / "bad.safetensors"])


def test_an_engine_exported_without_the_table_record_says_to_re_export(sd1_engine, tmp_path):
    engine = tmp_path / "engine"
    shutil.copytree(sd1_engine, engine)
    m = json.loads((engine / "sdrt.json").read_text())
    del m["components"]["text_encoder"]["token_embedding"]
    (engine / "sdrt.json").write_text(json.dumps(m))
    save_file({"emb_params": torch.zeros(1, 32)}, tmp_path / "e.safetensors")
    r = run_cli("generate", engine, "e", "--steps", 1, "--embedding", tmp_path / "e.safetensors",
                "-o", tmp_path / "x.png")
    assert_one_line_error(r, "token-embedding table", "re-export")
