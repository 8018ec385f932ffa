"""The embedded default model (models/shapes-32) draws what it is asked, through the whole torch-free chain:
tokenizer, text encoder, cross-attention, scheduler and VAE, exported and run by sdrt."""

from __future__ import annotations

import numpy as np
import pytest

from tools.shape_check import SHAPES, classify, prompt

# every color as object and as background, every shape: 12 combinations
COMBOS = [("red", "circle", "blue"), ("green", "square", "black"), ("blue", "triangle", "yellow"),
          ("yellow", "circle", "green"), ("white", "square", "red"), ("black", "triangle", "white"),
          ("red", "square", "white"), ("green", "triangle", "red"), ("blue", "circle", "black"),
          ("yellow", "triangle", "blue"), ("white", "circle", "green"), ("black", "square", "yellow")]


@pytest.fixture(scope="module")
def shapes_pipeline(shapes_engine):
    from sdrt.runtime import Pipeline

    return Pipeline(shapes_engine)


@pytest.fixture(scope="module")
def result(shapes_pipeline):
    return shapes_pipeline.generate([prompt(*c) for c in COMBOS], steps=25, guidance=7.5, seed=0)


@pytest.fixture(scope="module")
def drawn(result):
    return [classify(im) for im in result.images]


def test_backgrounds_and_object_colors_are_as_asked(drawn):
    for (obj, _, bg), got in zip(COMBOS, drawn):
        assert got["background"] == bg, (obj, bg, got)
        assert got["object"] == obj, (obj, bg, got)


def test_shapes_are_as_asked(drawn):
    right = [got["shape"] == shape for (_, shape, _), got in zip(COMBOS, drawn)]
    # the trainer measured 94.8% of 270 pictures right with diffusers; rounded squares read as circles are the
    # known miss, so allow one in twelve
    assert sum(right) >= len(COMBOS) - 1, list(zip(COMBOS, drawn))
    assert {got["shape"] for got in drawn} == set(SHAPES)


def test_the_prompt_reaches_the_picture(shapes_pipeline):
    """Same seed, different prompt: a different picture that follows the new prompt."""
    a = classify(shapes_pipeline.generate(prompt("red", "square", "green"), steps=25, seed=3).images[0])
    b = classify(shapes_pipeline.generate(prompt("yellow", "square", "black"), steps=25, seed=3).images[0])
    assert (a["object"], a["background"]) == ("red", "green")
    assert (b["object"], b["background"]) == ("yellow", "black")


def test_the_trained_tiny_vae_draws_what_the_full_one_draws(shapes_pipeline, result, drawn):
    """The same latents through the tiny decoder trained for this model: the same colors everywhere, and the
    same shapes but for a square or two read as a circle (its corners come out a little round: over 180
    pictures it costs 4.4 points of shape accuracy, benchmarks/RESULTS.md; on these 12, two squares)."""
    from sdrt.runtime.images import images_psnr

    tiny = shapes_pipeline.decode_latents(result.latents, "vae_decoder_tiny")
    readings = [classify(im) for im in tiny]
    for (obj, _, bg), got, full in zip(COMBOS, readings, drawn):
        assert (got["object"], got["background"]) == (full["object"], full["background"]) == (obj, bg)
    same_shape = [got["shape"] == full["shape"] for got, full in zip(readings, drawn)]
    assert sum(same_shape) >= len(COMBOS) - 2, list(zip(COMBOS, readings))
    assert all(got["shape"] == "circle" for got, full, same in zip(readings, drawn, same_shape) if not same)
    assert min(images_psnr(a, b) for a, b in zip(tiny, result.images)) > 18  # a picture, not just its labels
    np.testing.assert_array_equal(shapes_pipeline.decode_preview(result.latents[:1]), tiny[:1])
