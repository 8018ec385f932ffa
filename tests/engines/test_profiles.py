import pytest

from sdrt.engines.profiles import (
    Range, component_profiles, default_size_range, describe_profile, is_static, make_request, parse_range,
    profile_fits, size_multiple,
)
from sdrt.errors import UserError
from tests.engines.fake_engine_dir import MODEL

UNET_INPUTS = [
    {"name": "sample", "dtype": "float32", "shape": ["batch", 4, "latent_height", "latent_width"]},
    {"name": "timestep", "dtype": "float32", "shape": ["batch"]},
    {"name": "encoder_hidden_states", "dtype": "float32", "shape": ["batch", "sequence", 16]},
]
VAE_INPUTS = [{"name": "latent_sample", "dtype": "float32", "shape": ["batch", 4, "latent_height", "latent_width"]}]
TEXT_INPUTS = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", 8]}]


@pytest.mark.parametrize("text,want", [("1:2:4", Range(1, 2, 4)), ("3", Range(3, 3, 3)), (" 1:1:1 ", Range(1, 1, 1))])
def test_parse_range(text, want):
    assert parse_range(text, "batch") == want


@pytest.mark.parametrize("text,needle", [
    ("1:2", "MIN:OPT:MAX"), ("a:b:c", "integers"), ("0:1:2", "positive"), ("4:2:1", "MIN <= OPT <= MAX"),
    ("1:-1:2", "positive"),
])
def test_parse_range_errors_name_the_option(text, needle):
    with pytest.raises(UserError, match="--batch") as e:
        parse_range(text, "batch")
    assert needle in str(e.value)


def test_size_multiple_is_the_manifests():
    assert size_multiple(MODEL) == 16
    assert size_multiple(dict(MODEL, size_multiple=4)) == 4


def test_default_size_range_sd15():
    assert default_size_range(512, 64) == Range(256, 512, 1024)
    assert default_size_range(64, 16) == Range(32, 64, 128)


def test_sizes_off_grid_are_refused():
    with pytest.raises(UserError, match=r"--height .*72 is not a multiple of 16 \(the manifest's model\.size_mult"):
        make_request(MODEL, height="32:72:128")
    # what export writes: the VAE scale factor (SD1.5: 8), not a UNet downsampling on top of it
    sd15 = dict(MODEL, vae_scale_factor=8, size_multiple=8, default_height=512, default_width=512)
    with pytest.raises(UserError) as info:
        make_request(sd15, height="30")
    assert str(info.value) == ("--height 30:30:30: 30 is not a multiple of 8 "
                               "(the VAE scale factor: one latent per 8x8 pixels)")


def test_unet_batch_doubled_for_guidance_and_latents_scaled():
    req = make_request(MODEL, batch="1:2:4", height="32:64:128", width="64:64:64")
    (p,) = component_profiles("unet", UNET_INPUTS, MODEL, req)
    assert p["sample"] == {"min": [1, 4, 16, 32], "opt": [4, 4, 32, 32], "max": [8, 4, 64, 32]}
    assert p["timestep"] == {"min": [1], "opt": [4], "max": [8]}
    # text_max_length 8: one to three prompt chunks by default
    assert p["encoder_hidden_states"] == {"min": [1, 8, 16], "opt": [4, 8, 16], "max": [8, 24, 16]}
    (t,) = component_profiles("text_encoder", TEXT_INPUTS, MODEL, req)
    # prompts and negative prompts of 4 images, three chunks each
    assert t["input_ids"] == {"min": [1, 8], "opt": [2, 8], "max": [24, 8]}
    req = make_request(MODEL, batch="2:2:4", height="32:64:128", width="64:64:64")
    (t,) = component_profiles("text_encoder", TEXT_INPUTS, MODEL, req)
    assert t["input_ids"]["min"] == [1, 8]  # one prompt, several images: the text batch stays 1 or 2
    (v,) = component_profiles("vae_decoder", VAE_INPUTS, MODEL, req)
    assert v["latent_sample"]["max"] == [4, 4, 64, 32]


def test_prompt_chunks_set_the_unet_sequence_and_text_batch():
    req = make_request(MODEL, batch="1:1:2", chunks="1:2:4")
    (p,) = component_profiles("unet", UNET_INPUTS, MODEL, req)
    assert [p["encoder_hidden_states"][k][1] for k in ("min", "opt", "max")] == [8, 16, 32]
    (t,) = component_profiles("text_encoder", TEXT_INPUTS, MODEL, req)
    assert t["input_ids"] == {"min": [1, 8], "opt": [2, 8], "max": [16, 8]}
    # an engine exported before long prompts has a fixed sequence: its profile stays at one chunk
    old = [dict(UNET_INPUTS[2], shape=["batch", 8, 16])]
    (p,) = component_profiles("unet", old, MODEL, req)
    assert p["encoder_hidden_states"]["max"] == [4, 8, 16]
    with pytest.raises(UserError, match="--prompt-chunks"):
        make_request(MODEL, chunks="0:1:3")


def test_static_mode_collapses_to_opt_with_guided_and_unguided_profiles():
    req = make_request(MODEL, batch="1:2:4", height="32:64:128", width="32:64:128", static=True)
    unet = component_profiles("unet", UNET_INPUTS, MODEL, req)
    assert [p["sample"]["opt"] for p in unet] == [[2, 4, 32, 32], [4, 4, 32, 32]]
    assert is_static(unet)
    vae = component_profiles("vae_decoder", VAE_INPUTS, MODEL, req)
    assert len(vae) == 1 and is_static(vae)
    assert [p["encoder_hidden_states"]["max"] for p in unet] == [[2, 8, 16], [4, 8, 16]]  # one chunk (OPT)
    (text,) = component_profiles("text_encoder", TEXT_INPUTS, MODEL, req)
    assert text["input_ids"] == {"min": [1, 8], "opt": [2, 8], "max": [4, 8]}


def test_unknown_symbol_is_a_user_error():
    req = make_request(MODEL)
    with pytest.raises(UserError, match="'frames'"):
        component_profiles("unet", [{"name": "x", "dtype": "float32", "shape": ["frames"]}], MODEL, req)


def test_profile_fits_and_describe():
    req = make_request(MODEL, batch="1:1:2", height="32:64:64", width="32:64:64")
    (p,) = component_profiles("vae_decoder", VAE_INPUTS, MODEL, req)
    assert profile_fits(p, {"latent_sample": (2, 4, 16, 32)})
    assert not profile_fits(p, {"latent_sample": (3, 4, 16, 32)})
    assert not profile_fits(p, {"latent_sample": (1, 4, 8, 32)})
    assert not profile_fits(p, {"other": (1,)})
    assert describe_profile(p) == "latent_sample [1,4,16,16]..[2,4,32,32]"


def test_an_inpainting_unet_profiles_its_nine_channels():
    """The channel count comes from the manifest's input spec: a 9-channel inpainting UNet's sample keeps 9."""
    req = make_request(MODEL, batch="1:2:4", height="32:64:128", width="64:64:64")
    inputs = [{"name": "sample", "dtype": "float32", "shape": ["batch", 9, "latent_height", "latent_width"]},
              {"name": "timestep", "dtype": "float32", "shape": ["batch"]}]
    (profile,) = component_profiles("unet", inputs, MODEL, req)
    f = MODEL["vae_scale_factor"]
    assert profile["sample"] == {"min": [1, 9, 32 // f, 64 // f], "opt": [4, 9, 64 // f, 64 // f],
                                 "max": [8, 9, 128 // f, 64 // f]}
