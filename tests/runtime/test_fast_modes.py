"""CPU fast modes: feature caching across steps (the deep/shallow UNet pair), the tiny VAE decoder, bf16.

One engine of the tiny SD1 model, exported with the pair (branch 1) and a random AutoencoderTiny beside it.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.errors import SdrtWarning, UserError
from sdrt.runtime.precision import bf16_missing, check_precision
from tests.conftest import assert_one_line_error, run_cli

BRANCH = 1
TINY_SCALING = 0.5  # not 1.0, so a decoder given the wrong scaling would show


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    # the sd1-tiny VAE has two levels (scale factor 2): so must the tiny one
    vae = AutoencoderTiny(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                          num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4,
                          scaling_factor=TINY_SCALING)
    path = tmp_path_factory.mktemp("tiny-vae") / "taesd"
    vae.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def engine(sd1_model, tiny_vae_dir, tmp_path_factory):
    from sdrt.export import export_model

    path = tmp_path_factory.mktemp("fast") / "engine"
    export_model(sd1_model, path, components="text_encoder,unet,vae_decoder", cache_branch=BRANCH,
                 tiny_vae=tiny_vae_dir, cpu_variants=False, progress=False, log=lambda m: None)
    return path


@pytest.fixture(scope="module")
def plain(engine):
    from sdrt.runtime import Pipeline

    return Pipeline(engine)


KW = dict(steps=7, seed=3, guidance=7.5, scheduler="ddim")  # one UNet evaluation per step


def _counting(pipe, component, calls):
    session = pipe.sessions[component]
    run = session.run

    def counted(feeds):
        calls.append(component)
        return run(feeds)

    session.run = counted


def test_manifest_records_the_pair_and_the_tiny_decoder(engine):
    from sdrt.runtime.manifest import Manifest

    m = Manifest.load(engine, verify="sha256")
    assert m.data["feature_cache"] == {"branch": BRANCH, "deep": "unet_deep", "shallow": "unet_shallow",
                                       "feature": "deep_feature"}
    deep, shallow = m.component("unet_deep"), m.component("unet_shallow")
    assert [o["name"] for o in deep["outputs"]] == ["out_sample", "deep_feature"]
    assert [i["name"] for i in shallow["inputs"]][-1] == "deep_feature"
    assert deep["branch"] == shallow["branch"] == BRANCH
    for c in (deep, shallow, m.component("vae_decoder_tiny")):
        assert c["parity"]["rel_l2"] < 1e-4
    assert m.component("vae_decoder_tiny")["scaling_factor"] == TINY_SCALING
    assert shallow["size_bytes"] < deep["size_bytes"]  # the shallow UNet holds only the outer layers


def test_cache_interval_1_equals_the_plain_unet(engine, plain):
    from sdrt.runtime import Pipeline

    cached = Pipeline(engine, cache_interval=1)
    calls: list = []
    _counting(cached, "unet_deep", calls)
    _counting(cached, "unet_shallow", calls)
    a, b = plain.generate("a red circle", **KW), cached.generate("a red circle", **KW)
    assert calls == ["unet_deep"] * KW["steps"]
    np.testing.assert_allclose(b.latents, a.latents, rtol=0, atol=1e-5)
    assert np.abs(b.images[0].astype(int) - a.images[0]).max() <= 1


def test_the_shallow_unet_on_a_fresh_feature_equals_the_deep_unet(engine, plain):
    """Fed the feature the deep UNet computed from the same inputs, the shallow UNet gives the deep UNet's
    output: the split loses nothing but what caching skips."""
    from sdrt.runtime import Pipeline

    pipe = Pipeline(engine, cache_interval=2)
    req = pipe.request(["a red circle", "a blue square"], steps=5, seed=1, height=32, width=40)
    loop = pipe.start(req)
    inputs = loop.unet_inputs()
    deep = pipe.sessions["unet_deep"].run(inputs)
    shallow = pipe.sessions["unet_shallow"].run({**inputs, "deep_feature": deep["deep_feature"]})
    plain_out = plain.sessions["unet"].run(inputs)["out_sample"]
    np.testing.assert_allclose(shallow["out_sample"], deep["out_sample"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(deep["out_sample"], plain_out, rtol=0, atol=1e-5)


def test_cache_interval_3_alternates_and_costs_some_accuracy(engine, plain):
    from sdrt.runtime import Pipeline

    with pytest.warns(SdrtWarning, match="cache_interval 3: intervals above 2 cost more than 5 points"):
        cached = Pipeline(engine, cache_interval=3)
    calls: list = []
    _counting(cached, "unet_deep", calls)
    _counting(cached, "unet_shallow", calls)
    a, b = plain.generate("a red circle", **KW), cached.generate("a red circle", **KW)
    assert calls == ["unet_deep", "unet_shallow", "unet_shallow"] * 2 + ["unet_deep"]
    assert np.isfinite(b.latents).all()
    err = np.linalg.norm(b.latents - a.latents) / np.linalg.norm(a.latents)
    assert 1e-4 < err < 0.5, err  # a real approximation, not a different picture
    assert cached.mode == "fp32+cache3"


def test_caching_needs_the_pair(sd1_engine, engine):
    from sdrt.runtime import Pipeline

    with pytest.raises(UserError, match="--cache-branch"):
        Pipeline(sd1_engine, cache_interval=3)
    with pytest.raises(UserError, match="cache_interval 0"):
        Pipeline(engine, cache_interval=0)
    # the service takes it (tests/serve/test_engine_modes.py)


def test_the_tiny_decoder_equals_diffusers_autoencoder_tiny(engine, tiny_vae_dir):
    import torch
    from diffusers import AutoencoderTiny

    from sdrt.runtime import Pipeline

    pipe = Pipeline(engine, vae="tiny")
    latents = np.random.default_rng(0).standard_normal((2, 4, 9, 11)).astype(np.float32)
    ours = pipe.vae_decode(latents)
    ref = AutoencoderTiny.from_pretrained(tiny_vae_dir).eval()
    with torch.no_grad():  # as diffusers' pipelines decode: latents / vae.config.scaling_factor
        want = ref.decode(torch.from_numpy(latents) / ref.config.scaling_factor).sample.numpy()
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-5)
    assert "vae_decoder" not in pipe.sessions  # the full decoder is not loaded when the tiny one decodes
    images = pipe.generate("a red circle", steps=3, seed=0).images
    assert images[0].shape == (32, 32, 3) and pipe.mode == "fp32+tiny-vae"


def test_previews_use_the_tiny_decoder_when_present(engine, plain, sd1_engine):
    from sdrt.runtime import Pipeline

    latents = np.random.default_rng(1).standard_normal((1, 4, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(plain.decode_preview(latents), plain.decode_latents(latents, "vae_decoder_tiny"))
    assert not np.array_equal(plain.decode_preview(latents), plain.decode_latents(latents))
    without = Pipeline(sd1_engine)
    np.testing.assert_array_equal(without.decode_preview(latents), without.decode_latents(latents))
    with pytest.raises(UserError, match="--tiny-vae"):
        Pipeline(sd1_engine, vae="tiny")


def test_generate_cli_runs_a_mode_and_says_which(engine, tmp_path):
    r = run_cli("generate", engine, "a red circle", "-o", tmp_path / "x.png", "--steps", 4, "--seed", 1,
                "--cache-interval", 2, "--vae", "tiny", "--preview", tmp_path / "p.gif", "-q")
    assert r.returncode == 0, r.stderr
    assert "mode fp32+cache2+tiny-vae" in r.stderr
    assert (tmp_path / "x.png").is_file() and (tmp_path / "p.gif").is_file()


def test_bf16_is_refused_in_one_line_where_the_cpu_lacks_it(engine, tmp_path):
    r = run_cli("generate", engine, "a red circle", "-o", tmp_path / "x.png", "--precision", "bf16", "--steps", 2)
    assert_one_line_error(r, "bf16", "openvino")
    missing = bf16_missing()
    r = run_cli("generate", engine, "a red circle", "-o", tmp_path / "x.png", "--precision", "bf16",
                "--backend", "openvino", "--steps", 2)
    if missing:
        assert_one_line_error(r, "AVX512_BF16", "AMX")
    else:
        assert r.returncode == 0, r.stderr


def test_precision_check_reads_the_cpu_flags():
    assert check_precision("bf16", "openvino", flags={"avx2", "avx512_bf16"}) == "bf16"
    assert check_precision("bf16", "openvino", flags={"amx_bf16"}) == "bf16"
    with pytest.raises(UserError, match="AVX512_BF16 nor AMX"):
        check_precision("bf16", "openvino", flags={"avx2", "fma", "f16c"})
    with pytest.raises(UserError, match="choose one of fp32, bf16"):
        check_precision("fp16", "openvino")
    assert check_precision("fp32", "cpu", flags=set()) == "fp32"


@pytest.mark.skipif(bf16_missing() is not None, reason=f"bf16 arithmetic: {bf16_missing()}")
def test_bf16_runs_close_to_fp32(engine, plain):
    pytest.importorskip("openvino")
    from sdrt.runtime import Pipeline

    fp32 = Pipeline(engine, backend="openvino")
    bf16 = Pipeline(engine, backend="openvino", precision="bf16")
    a, b = fp32.generate("a red circle", **KW), bf16.generate("a red circle", **KW)
    err = np.linalg.norm(b.latents - a.latents) / np.linalg.norm(a.latents)
    assert 0 < err < 0.2, err
    assert bf16.mode == "bf16" and "bf16" in bf16.backend.describe()


def test_modes_read_back_as_written():
    from sdrt.runtime.modes import mode_name, parse_mode

    for mode in ({"precision": "fp32", "cache_interval": None, "vae": "full"},
                 {"precision": "bf16", "cache_interval": 3, "vae": "tiny"}):
        assert parse_mode(mode_name(**mode)) == mode
    assert mode_name("bf16", 3, "tiny") == "bf16+cache3+tiny-vae"
    with pytest.raises(UserError, match="'cache0' is not a mode word"):
        parse_mode("fp32+cache0")


def test_modes_more_than_5_points_below_fp32_warn():
    from sdrt.runtime.modes import unoffered

    assert unoffered(None, "full") is None and unoffered(2, "full") is None and unoffered(None, "tiny") is None
    assert "above 2" in unoffered(3, "full") and "with vae 'tiny'" in unoffered(2, "tiny")


def test_bench_runs_two_modes_side_by_side_and_names_them(engine):
    from sdrt.bench.report import markdown
    from sdrt.bench.runner import Settings, run_bench

    result = run_bench(str(engine), None, Settings(steps=3, runs=1, warmup=0, mode="fp32+tiny-vae",
                                                   compare_mode="fp32+cache2"), progress=False)
    runs = {r["name"]: r for r in result["runs"]}
    assert runs["sdrt"]["mode"] == "fp32+tiny-vae" and runs["sdrt:fp32+cache2"]["mode"] == "fp32+cache2"
    q = result["ratio"]["compare_mode"]
    assert q["end_to_end"] == pytest.approx(runs["sdrt:fp32+cache2"]["end_to_end_s"]["p50"]
                                            / runs["sdrt"]["end_to_end_s"]["p50"])
    table = markdown(result)
    assert "| sdrt:fp32+cache2 | fp32+cache2 |" in table and "sdrt:fp32+cache2 / sdrt (p50)" in table


def test_openvino_keeps_compiled_models_in_a_cache(engine, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    from sdrt.runtime import Pipeline
    from sdrt.runtime.backends.openvino import CACHE_DIR_ENV

    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "ov"))
    first = Pipeline(engine, backend="openvino")
    blobs = sorted(p.name for p in (tmp_path / "ov").iterdir())
    assert len(blobs) >= 3  # text encoder, UNet, VAE decoder(s)
    a = first.generate("a red circle", steps=2, seed=0).images[0]
    again = Pipeline(engine, backend="openvino")  # loads from the cache: nothing new is written
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == blobs
    np.testing.assert_array_equal(again.generate("a red circle", steps=2, seed=0).images[0], a)
