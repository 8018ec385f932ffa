"""`sdrt export --lora`: LoRAs fused into the exported weights, equal to diffusers and to the same LoRAs applied
at run time; the manifest records them; refusals are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdrt.runtime.images import images_psnr
from tests.conftest import assert_one_line_error, run_cli

torch = pytest.importorskip("torch")

SCALES = (0.8, 0.5)
SETTINGS = dict(steps=6, guidance=7.5, seed=11)
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def fused_engine(sd1_model, lora_files, tmp_path_factory):
    """sd1-tiny exported with both kohya LoRAs fused, each at its scale."""
    engine = tmp_path_factory.mktemp("fused") / "engine"
    loras = [f"{path}:{scale}" for path, scale in zip(lora_files["sd1-tiny", "kohya"], SCALES)]
    r = run_cli("export", sd1_model, engine, "-q", "--components", "text_encoder,unet,vae_decoder",
                *[a for lora in loras for a in ("--lora", lora)])
    assert r.returncode == 0, r.stderr
    return engine


def test_fused_export_equals_run_time_loras_and_diffusers(fused_engine, sd1_engine, sd1_model, lora_files):
    from sdrt.runtime import Pipeline
    from tests.runtime.test_lora import reference, reference_image

    loras = list(zip(lora_files["sd1-tiny", "kohya"], SCALES))
    fused = Pipeline(fused_engine).generate(PROMPT, **SETTINGS).images[0]
    at_run_time = Pipeline(sd1_engine, loras=loras).generate(PROMPT, **SETTINGS).images[0]
    plain = Pipeline(sd1_engine).generate(PROMPT, **SETTINGS).images[0]
    theirs = reference_image(reference(sd1_model, loras), **SETTINGS)
    print(f"fused vs run time {images_psnr(fused, at_run_time):.1f} dB, fused vs diffusers "
          f"{images_psnr(fused, theirs):.1f} dB, plain vs diffusers {images_psnr(plain, theirs):.1f} dB")
    assert images_psnr(fused, at_run_time) >= 40
    assert images_psnr(fused, theirs) >= 40
    assert images_psnr(plain, theirs) < 35, "the LoRAs changed nothing"


def test_the_manifest_records_the_fused_loras_and_parity(fused_engine, lora_files):
    m = json.loads((fused_engine / "sdrt.json").read_text())
    records = m["source"]["loras"]
    assert [(r["file"], r["scale"], r["format"]) for r in records] == [
        (str(p.resolve()), s, "kohya") for p, s in zip(lora_files["sd1-tiny", "kohya"], SCALES)]
    assert all(len(r["sha256"]) == 64 for r in records)
    for comp in ("text_encoder", "unet"):  # parity was checked against the patched PyTorch model
        assert m["components"][comp]["parity"]["rel_l2"] <= 1e-4
        assert m["components"][comp]["weight_map"]["unmapped"] == 0


def test_run_time_loras_stack_on_a_fused_export(fused_engine, sd1_engine, lora_files):
    """A LoRA fused at export plus another at run time equals both at run time."""
    from sdrt.runtime import Pipeline

    a, b = lora_files["sd1-tiny", "kohya"]
    extra = lora_files["sd1-tiny", "peft"][1]
    stacked = Pipeline(fused_engine, loras=[(extra, 0.6)]).generate(PROMPT, **SETTINGS).images[0]
    both = Pipeline(sd1_engine, loras=[(a, SCALES[0]), (b, SCALES[1]), (extra, 0.6)]).generate(
        PROMPT, **SETTINGS).images[0]
    assert images_psnr(stacked, both) >= 40


def test_export_lora_refusals(sd1_model, lora_files, tmp_path):
    from safetensors.numpy import save_file

    stray = tmp_path / "stray.safetensors"
    save_file({"lora_unet_not_a_module.lora_down.weight": np.ones((2, 4), np.float32),
               "lora_unet_not_a_module.lora_up.weight": np.ones((4, 2), np.float32)}, str(stray))
    r = run_cli("export", sd1_model, tmp_path / "e", "-q", "--components", "unet", "--lora", stray)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "'not_a_module'" in r.stderr.strip().splitlines()[-1] and "match no weight" in r.stderr
    assert not (tmp_path / "e").exists()
    # the text encoder layers of the LoRA would be dropped: refused before any work
    assert_one_line_error(run_cli("export", sd1_model, tmp_path / "e", "-q", "--components", "unet", "--lora",
                                  lora_files["sd1-tiny", "kohya"][1]),
                          "patches text_encoder, which this export does not have")
    assert_one_line_error(run_cli("export", sd1_model, tmp_path / "e", "--lora", tmp_path / "missing.safetensors"),
                          "missing.safetensors", "does not exist")


def test_sdxl_fused_export_equals_the_run_time_lora(tiny_model, tmp_path):
    """SDXL: a kohya file with the UNet in the original layout's names and both text encoders, fused at export,
    draws what the same LoRA applied at run time draws."""
    from sdrt.runtime import Pipeline
    from tools.make_loras import make_lora

    model, engine = tiny_model("sdxl-tiny")
    lora = make_lora(model, tmp_path / "xl.safetensors", "kohya", rank=4, alpha=2.0, seed=5, sgm=True)
    fused_engine = tmp_path / "fused"
    r = run_cli("export", model, fused_engine, "-q", "--components",
                "text_encoder,text_encoder_2,unet,vae_decoder", "--lora", f"{lora}:0.8")
    assert r.returncode == 0, r.stderr
    assert [x["scale"] for x in json.loads((fused_engine / "sdrt.json").read_text())["source"]["loras"]] == [0.8]
    fused = Pipeline(fused_engine).generate(PROMPT, **SETTINGS).images[0]
    at_run_time = Pipeline(engine, loras=[(lora, 0.8)]).generate(PROMPT, **SETTINGS).images[0]
    plain = Pipeline(engine).generate(PROMPT, **SETTINGS).images[0]
    assert images_psnr(fused, at_run_time) >= 50
    assert images_psnr(fused, plain) < 35, "the LoRA changed nothing"
