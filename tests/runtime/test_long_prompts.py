"""Long and weighted prompts through the torch-free pipeline, against AUTOMATIC1111's reading computed with
diffusers' own tokenizer and text encoder in torch (sdrt.bench.reference.a1111_prompt_embeds), and the UNet
graphs at 77*k tokens against diffusers given those embeddings."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sdrt.errors import UserError
from sdrt.runtime.images import images_psnr
from tests.conftest import assert_one_line_error, run_cli

torch = pytest.importorskip("torch")
from sdrt.bench.reference import a1111_prompt_embeds, diffusers_pipeline, diffusers_scheduler  # noqa: E402

# three chunks: a BREAK, emphasis of every kind, and a comma near the end of the second chunk (word wrap)
LONG = ("a (red circle:1.3) on a [blue] background, ((masterpiece)) BREAK "
        + ", ".join(f"a small (green square:{0.8 + 0.05 * i:.2f}) near edge {i}" for i in range(13)))
NEGATIVE = "ugly, [[blurry]], (low quality:1.4)"


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def pipes(engine_dirs):
    from sdrt.runtime import Pipeline

    return {kind: Pipeline(path) for kind, path in engine_dirs.items()}


@pytest.fixture(scope="module")
def references(model_dirs):
    return {kind: diffusers_pipeline(path) for kind, path in model_dirs.items()}


@pytest.mark.parametrize("kind", ["sd1-tiny", "sd2-tiny"])
def test_long_weighted_prompts_equal_the_torch_reference(pipes, references, kind):
    pipe, ref = pipes[kind], references[kind]
    prompts = [LONG, NEGATIVE, "a plain short prompt"]
    ours = pipe.encode_prompts(prompts)
    theirs = a1111_prompt_embeds(ref, prompts).numpy()
    length = pipe.model.text_max_length
    assert ours.shape == theirs.shape == (3, 3 * length, pipe.model.text_hidden_size)
    err = rel_l2(ours, theirs)
    print(f"{kind}: 3-chunk weighted prompts vs torch reference: rel_l2 {err:.2e}")
    assert err <= 1e-5
    # the reference reads a short unweighted prompt as diffusers does, and so do we
    with torch.no_grad():
        plain = ref.encode_prompt("a plain short prompt", "cpu", 1, False)[0].numpy()[0]
    np.testing.assert_allclose(ours[2, :length], plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd1-tiny", "sd2-tiny"])
def test_three_chunk_image_matches_diffusers_given_the_reference_embeddings(pipes, references, kind):
    pipe, ref = pipes[kind], references[kind]
    kw = dict(steps=4, guidance=7.5, seed=11, scheduler="euler_a")
    ours = pipe.generate(LONG, NEGATIVE, **kw)
    assert ours.request.prompt_tokens.chunks == 3
    embeds = a1111_prompt_embeds(ref, [LONG, NEGATIVE])
    ref.scheduler = diffusers_scheduler("euler_a", dict(ref.scheduler.config))
    image = ref(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], num_inference_steps=4,
                guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(11), output_type="np").images[0]
    image = (image * 255).round().astype(np.uint8)
    psnr = images_psnr(ours.images[0], image)
    cut = pipe.generate(LONG, NEGATIVE, truncate=True, **kw).images[0]
    print(f"{kind}: 3-chunk image vs diffusers {psnr:.1f} dB; vs the truncated prompt {images_psnr(cut, image):.1f} dB")
    assert psnr >= 40
    assert images_psnr(cut, image) < 35  # the chunks past the first change the picture


def test_a_prompt_without_weights_is_unchanged(pipes):
    pipe = pipes["sd1-tiny"]
    prompt = "a red circle on a blue background"
    for variant in (prompt, "a (red:1.0) circle on a blue background"):
        np.testing.assert_array_equal(pipe.encode_prompts([variant]), pipe.encode_prompts([prompt], weighting=False))


@pytest.fixture(scope="module")
def old_engine(engine_dirs, tmp_path_factory):
    """An engine directory as sdrt wrote it before long prompts: the UNet's text axis fixed at one chunk."""
    engine = tmp_path_factory.mktemp("old") / "engine"
    shutil.copytree(engine_dirs["sd1-tiny"], engine)
    m = json.loads((engine / "sdrt.json").read_text())
    unet = m["components"]["unet"]["inputs"]
    unet[2]["shape"][1] = m["model"]["text_max_length"]
    del m["components"]["text_encoder"]["token_embedding"]
    (engine / "sdrt.json").write_text(json.dumps(m))
    return engine


def test_an_engine_with_a_fixed_text_axis_takes_one_chunk_and_says_so(old_engine):
    from sdrt.runtime import Pipeline

    pipe = Pipeline(old_engine)
    assert pipe.max_prompt_chunks == 1
    assert pipe.request("a red circle", steps=1).prompt_tokens.chunks == 1
    with pytest.raises(UserError, match=r"at most 1 chunk \(75 tokens; its UNet was exported for 77 tokens"):
        pipe.request(LONG, steps=1)
    with pytest.raises(UserError, match="in 2 chunks"):
        pipe.request("x", negative_prompt=", ".join(["a red circle on a blue background"] * 12), steps=1)
    assert pipe.request(LONG, steps=1, truncate=True).prompt_tokens.chunks == 1
    r = run_cli("generate", old_engine, LONG, "--steps", 1, "-o", old_engine / "x.png", "-q")
    assert_one_line_error(r, "at most 1 chunk", "--truncate")
