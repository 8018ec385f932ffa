"""`sdrt export FILE.safetensors`: single-file checkpoints in the original (LDM) layout, made from the tiny
diffusers models (tools/to_single_file.py, checked by loading them back with diffusers' from_single_file),
exported offline; the family, the prediction type and how it was told; the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdrt.runtime.images import images_psnr
from tests.conftest import assert_one_line_error, run_cli

torch = pytest.importorskip("torch")
SETTINGS = dict(steps=4, guidance=7.5, seed=5)
PARTS = "text_encoder,unet,vae_decoder"


@pytest.fixture(scope="module")
def single_files(model_dirs, tmp_path_factory):
    from tools.to_single_file import to_single_file

    base = tmp_path_factory.mktemp("single")
    return {"sd1": to_single_file(model_dirs["sd1-tiny"], base / "sd1.safetensors"),
            "sd2-novae": to_single_file(model_dirs["sd2-tiny"], base / "sd2-novae.safetensors", vae=False,
                                        vae_out=base / "sd2-vae.safetensors"),
            "sd2-vae": base / "sd2-vae.safetensors",
            "sd2-vpred": to_single_file(model_dirs["sd2-tiny"], base / "sd2-vpred.safetensors", v_pred_key=True)}


def manifest(engine):
    return json.loads((engine / "sdrt.json").read_text())


@pytest.mark.parametrize("kind", ["sd1-tiny", "sd2-tiny"])
def test_the_files_load_back_in_diffusers(model_dirs, single_files, kind):
    """The conversion to the original layout is right: diffusers' from_single_file gives the same weights."""
    from diffusers import StableDiffusionPipeline

    file = single_files["sd1" if kind == "sd1-tiny" else "sd2-vpred"]
    ours = StableDiffusionPipeline.from_single_file(str(file), config=str(model_dirs[kind]), local_files_only=True)
    original = StableDiffusionPipeline.from_pretrained(model_dirs[kind])
    for comp in ("unet", "vae", "text_encoder"):
        a, b = getattr(original, comp).state_dict(), getattr(ours, comp).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), comp


def test_sd1_single_file_exports_like_its_folder(single_files, sd1_model, sd1_engine, tmp_path):
    from sdrt.runtime import Pipeline

    engine = tmp_path / "e"
    r = run_cli("export", single_files["sd1"], engine, "-q", "--components", PARTS, "--config", sd1_model)
    assert r.returncode == 0, r.stderr
    source = manifest(engine)["source"]["single_file"]
    assert source["family"] == "sd1" and source["prediction_type"] == {"value": "epsilon",
                                                                       "how": "SD1.x predicts the noise"}
    assert source["sha256"] and source["vae"] is None
    for comp, entry in manifest(engine)["components"].items():
        assert entry["parity"]["rel_l2"] <= 1e-4, comp  # against diffusers' from_single_file modules
    a = Pipeline(engine).generate("a red circle", **SETTINGS).images[0]
    b = Pipeline(sd1_engine).generate("a red circle", **SETTINGS).images[0]
    assert images_psnr(a, b) >= 60
    assert manifest(engine)["model"] == manifest(sd1_engine)["model"]


def test_sd2_with_a_separate_vae_and_a_declared_prediction_type(single_files, sd2_model, sd2_engine, tmp_path):
    from sdrt.runtime import Pipeline

    engine = tmp_path / "e"
    assert_one_line_error(run_cli("export", single_files["sd2-novae"], engine, "--config", sd2_model),
                          "has no VAE", "--vae FILE")
    r = run_cli("export", single_files["sd2-novae"], engine, "-q", "--components", PARTS, "--config", sd2_model,
                "--vae", single_files["sd2-vae"], "--prediction-type", "v_prediction")
    assert r.returncode == 0, r.stderr
    m = manifest(engine)
    assert m["source"]["single_file"]["prediction_type"] == {"value": "v_prediction", "how": "--prediction-type"}
    assert m["source"]["single_file"]["vae"]["file"] == str(single_files["sd2-vae"].resolve())
    assert m["model"]["prediction_type"] == "v_prediction" and m["model"]["pad_token"] == "!"
    a = Pipeline(engine).generate("a red circle", **SETTINGS).images[0]
    b = Pipeline(sd2_engine).generate("a red circle", **SETTINGS).images[0]
    assert images_psnr(a, b) >= 60


def test_sd2_prediction_type_from_the_file(single_files, sd2_model, tmp_path):
    from sdrt.export.single_file import convert_single_file, inspect_single_file, v_prediction_test

    record = convert_single_file(inspect_single_file(single_files["sd2-vpred"]), tmp_path / "a", config_dir=sd2_model,
                                 log=lambda m: None)
    assert record["prediction_type"] == {"value": "v_prediction", "how": "the checkpoint's v_pred key"}
    # without a key nor a flag: AUTOMATIC1111's test on the weights decides, and says so
    sf = inspect_single_file(single_files["sd2-vae"].with_name("sd2-novae.safetensors"))
    record = convert_single_file(sf, tmp_path / "b", config_dir=sd2_model, vae=single_files["sd2-vae"],
                                 log=lambda m: None)
    how = record["prediction_type"]["how"]
    assert how.startswith("weights: AUTOMATIC1111's test") and record["prediction_type"]["value"] in (
        "epsilon", "v_prediction")
    saved = json.loads((tmp_path / "b" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == record["prediction_type"]["value"]

    class Constant(torch.nn.Module):  # a UNet that answers -x0-like values is a v-prediction one
        config = type("C", (), {"in_channels": 4, "cross_attention_dim": 8})

        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, x, t, context):
            return type("O", (), {"sample": torch.full_like(x, self.value)})

    assert v_prediction_test(Constant(-1.0))[0] and not v_prediction_test(Constant(0.3))[0]


def _header_file(path, shapes):
    from safetensors.numpy import save_file

    save_file({k: np.zeros(s, np.float32) for k, s in shapes.items()}, str(path))
    return path


def test_sdxl_single_file_exports_like_its_folder(tiny_model, tmp_path):
    """SDXL base in the original (SGM) layout: both text encoders, the added conditioning, offline; it loads back
    in diffusers' from_single_file with the same weights, and the export draws its folder's pictures."""
    from diffusers import StableDiffusionXLPipeline

    from sdrt.runtime import Pipeline
    from tools.to_single_file import to_single_file

    model, folder_engine = tiny_model("sdxl-tiny")
    file = to_single_file(model, tmp_path / "xl.safetensors")
    ours = StableDiffusionXLPipeline.from_single_file(str(file), config=str(model), local_files_only=True)
    original = StableDiffusionXLPipeline.from_pretrained(model)
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(original, comp).state_dict(), getattr(ours, comp).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), comp
    del ours, original
    engine = tmp_path / "e"
    r = run_cli("export", file, engine, "-q", "--components", "text_encoder,text_encoder_2,unet,vae_decoder",
                "--config", model)
    assert r.returncode == 0, r.stderr
    source = manifest(engine)["source"]["single_file"]
    assert source["family"] == "sdxl" and source["prediction_type"]["value"] == "epsilon"
    assert manifest(engine)["model"] == manifest(folder_engine)["model"]
    for comp, entry in manifest(engine)["components"].items():
        assert entry["parity"]["rel_l2"] <= 1e-4, comp
    a = Pipeline(engine).generate("a red circle", **SETTINGS).images[0]
    b = Pipeline(folder_engine).generate("a red circle", **SETTINGS).images[0]
    assert images_psnr(a, b) >= 60


@pytest.mark.parametrize("shapes, needles", [
    ({"conditioner.embedders.0.model.token_embedding.weight": (49408, 32),
      "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)}, ["SDXL refiner", "diffusers folder"]),
    ({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 32),
      "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)}, ["no text encoder sdrt knows", "SDXL"]),
    ({"model.diffusion_model.input_blocks.0.0.weight": (8, 7, 3, 3), "model.diffusion_model.out.2.weight": (4, 8, 3, 3)},
     ["7 input channels", "supported: 4 (txt2img, img2img) and 9 (inpainting)"]),
    ({"down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3)}, ["not an original-layout", "down_blocks.0.resnets"]),
    ({"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)}, ["no text encoder sdrt knows"]),
])
def test_other_files_are_refused_naming_what_was_found(tmp_path, shapes, needles):
    f = _header_file(tmp_path / "x.safetensors", shapes)
    assert_one_line_error(run_cli("export", f, tmp_path / "e"), *needles)
    assert not (tmp_path / "e").exists()


def test_pickle_and_misplaced_flags_are_refused(sd1_model, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04.")
    assert_one_line_error(run_cli("export", ckpt, tmp_path / "e"), "pickle", ".safetensors")
    assert_one_line_error(run_cli("export", sd1_model, tmp_path / "e", "--prediction-type", "epsilon"),
                          "--prediction-type applies to single-file checkpoints")


def test_shipped_configs_describe_the_sd_architectures():
    """The configs single files convert with are the SD1.5 and SD2.x architectures (the SD1.5 numbers are the
    ones tools/make_models.py builds its full-size benchmark model from), and load without a network."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from sdrt.export.single_file import CONFIG_ROOT
    from tools.make_models import _configs

    sd15 = _configs("sd15")
    unet = UNet2DConditionModel.load_config(CONFIG_ROOT / "sd1" / "unet")
    for k, v in sd15["unet"].items():
        assert unet[k] == (list(v) if isinstance(v, tuple) else v), k
    vae = AutoencoderKL.load_config(CONFIG_ROOT / "sd1" / "vae")
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["scaling_factor"] == 0.18215
    text = CLIPTextConfig.from_pretrained(CONFIG_ROOT / "sd1" / "text_encoder")
    assert (text.hidden_size, text.num_hidden_layers, text.hidden_act) == (768, 12, "quick_gelu")
    sd2 = CLIPTextConfig.from_pretrained(CONFIG_ROOT / "sd2" / "text_encoder")
    assert (sd2.hidden_size, sd2.num_hidden_layers, sd2.num_attention_heads, sd2.hidden_act) == (1024, 23, 16, "gelu")
    unet2 = UNet2DConditionModel.load_config(CONFIG_ROOT / "sd2" / "unet")
    assert unet2["cross_attention_dim"] == 1024 and unet2["use_linear_projection"]
    assert json.loads((CONFIG_ROOT / "sd2" / "tokenizer" / "special_tokens_map.json").read_text())["pad_token"] == "!"
    # SDXL base: the 2.6B-parameter UNet with added conditioning, CLIP ViT-L + OpenCLIP ViT-bigG (pads with "!")
    xl = UNet2DConditionModel.load_config(CONFIG_ROOT / "sdxl" / "unet")
    assert (xl["cross_attention_dim"], xl["transformer_layers_per_block"], xl["addition_embed_type"],
            xl["projection_class_embeddings_input_dim"]) == (2048, [1, 2, 10], "text_time", 2816)
    assert AutoencoderKL.load_config(CONFIG_ROOT / "sdxl" / "vae")["scaling_factor"] == 0.13025
    te2 = CLIPTextConfig.from_pretrained(CONFIG_ROOT / "sdxl" / "text_encoder_2")
    assert (te2.hidden_size, te2.num_hidden_layers, te2.projection_dim) == (1280, 32, 1280)
    assert CLIPTextConfig.from_pretrained(CONFIG_ROOT / "sdxl" / "text_encoder").hidden_size == 768
    assert json.loads((CONFIG_ROOT / "sdxl" / "tokenizer_2" / "special_tokens_map.json").read_text())["pad_token"] == "!"


def test_the_shipped_clip_vocabulary_is_clips():
    import importlib.util

    if importlib.util.find_spec("clip") is None:  # found, not imported: clip's __init__ needs pkg_resources
        pytest.skip("clip-anytorch provides the reference merge list")
    from sdrt.export.clip_vocab import shipped_merges
    from tools.clip_vocab import clip_merges_and_vocab

    assert shipped_merges() == clip_merges_and_vocab()[0]
