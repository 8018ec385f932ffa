"""ControlNets: exported as their own graphs beside the UNet that takes their residuals, and run by the torch-free
runtime as diffusers' ControlNet pipelines run them (same seed, same picture), alone and batched."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdrt.errors import UserError
from sdrt.runtime.images import images_psnr
from tests.conftest import assert_one_line_error, run_cli, served_with_calls

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from sdrt.bench.reference import diffusers_scheduler  # noqa: E402

H, W = 24, 40
PROMPT, NEGATIVE = "a red fox in the snow", "blurry"


def _reference(controlled, names, **kw):
    nets = [diffusers.ControlNetModel.from_pretrained(controlled["nets"][n]) for n in names]
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        controlled["model"], controlnet=nets[0] if len(nets) == 1 else diffusers.MultiControlNetModel(nets),
        safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_manifest_records_each_controlnet_and_the_residual_unet(controlled):
    import json

    m = json.loads((controlled["engine"] / "sdrt.json").read_text())
    assert sorted(m["controlnets"]) == ["depth", "edges"]
    for name in ("edges", "depth"):
        record = m["controlnets"][name]
        assert (record["kind"], record["component"], record["unet"]) == ("controlnet", f"controlnet/{name}",
                                                                         "unet_control")
    for comp in ("controlnet/edges", "controlnet/depth", "unet_control"):
        assert m["components"][comp]["parity"]["rel_l2"] <= 1e-4, comp
    # like the plain UNet, the CPU backend's graph with fused attention beside the portable one
    cpu = m["components"]["unet_control"]["variants"]["cpu"]
    assert cpu["attention"] == "com.microsoft.MultiHeadAttention" and cpu["parity"]["rel_l2"] <= 1e-4
    outs = [o["name"] for o in m["components"]["controlnet/edges"]["outputs"]]
    ins = [i["name"] for i in m["components"]["unet_control"]["inputs"]]
    assert outs[-1] == "mid_residual" and ins[3:] == outs == m["controlnets"]["edges"]["residuals"]


@pytest.mark.parametrize("scheduler, guess", [("euler_a", False), ("dpmpp_2m", False), ("ddim", True)])
def test_two_controlnets_with_scales_and_windows_equal_diffusers(controlled, scheduler, guess):
    from sdrt.runtime import Pipeline

    ours = Pipeline(controlled["engine"]).generate(
        PROMPT, negative_prompt=NEGATIVE, steps=6, guidance=7.5, seed=3, scheduler=scheduler, height=H, width=W,
        controls=[("edges", controlled["pictures"][0], 0.8, 0.0, 0.7),
                  {"name": "depth", "image": str(controlled["pictures"][1]), "scale": 1.3, "start": 0.2}],
        guess_mode=guess).images[0]
    ref = _reference(controlled, ["edges", "depth"])
    ref.scheduler = diffusers_scheduler(scheduler, dict(ref.scheduler.config))
    want = ref(PROMPT, negative_prompt=NEGATIVE, image=[Image.open(p) for p in controlled["pictures"]],
               num_inference_steps=6, guidance_scale=7.5, height=H, width=W,
               generator=torch.Generator("cpu").manual_seed(3), controlnet_conditioning_scale=[0.8, 1.3],
               control_guidance_start=[0.0, 0.2], control_guidance_end=[0.7, 1.0], guess_mode=guess).images[0]
    assert images_psnr(ours, np.asarray(want)) >= 40


def test_one_controlnet_equals_diffusers_and_the_plain_path_is_unchanged(controlled, sd1_engine):
    from sdrt.runtime import Pipeline

    pipe = Pipeline(controlled["engine"])
    ours = pipe.generate(PROMPT, steps=5, seed=4, height=H, width=W,
                         controls=[f"edges:{controlled['pictures'][0]}:0.6"]).images[0]
    ref = _reference(controlled, ["edges"])
    want = ref(PROMPT, image=Image.open(controlled["pictures"][0]), num_inference_steps=5, height=H, width=W,
               generator=torch.Generator("cpu").manual_seed(4), controlnet_conditioning_scale=0.6).images[0]
    assert images_psnr(ours, np.asarray(want)) >= 40
    plain = pipe.generate(PROMPT, steps=5, seed=4, height=H, width=W).images[0]
    assert images_psnr(plain, np.asarray(want)) < 40                     # the ControlNet changed the picture
    np.testing.assert_array_equal(plain, Pipeline(sd1_engine).generate(PROMPT, steps=5, seed=4, height=H,
                                                                       width=W).images[0])
    assert "unet_control" in pipe.sessions and "unet_control" not in Pipeline(controlled["engine"]).sessions


def test_requests_with_and_without_controlnets_share_unet_calls(controlled):
    from sdrt.runtime import Pipeline

    asks = [dict(prompt=PROMPT, steps=5, seed=1, height=H, width=W,
                 controls=[("edges", str(controlled["pictures"][0]), 0.9)]),
            dict(prompt="a cat", steps=5, seed=2, height=H, width=W),
            dict(prompt="a dog", steps=5, seed=3, height=H, width=W,
                 controls=[("depth", str(controlled["pictures"][1]), 1.1, 0.0, 0.6)])]
    alone = [Pipeline(controlled["engine"]).generate(**a).images[0] for a in asks]
    pipe = Pipeline(controlled["engine"])
    pipe.generate(**asks[0])   # loads the ControlNet sessions, so the engine's calls can be counted
    served, calls = served_with_calls(pipe, asks, ("unet", "unet_control"))
    for a, b in zip(served, alone):
        assert images_psnr(a, b) >= 60
    assert ("unet_control", 6) in calls   # three guided requests, with and without residuals, in one call


def test_a_controlnet_taking_fewer_samples_than_the_unet_is_called_in_parts(controlled):
    """A ControlNet and residual UNet whose TensorRT plans take fewer samples than the UNet's (built apart with a
    smaller `sdrt build --batch`; stand-ins that say so through dim_limit, as the TensorRT backend does): their
    calls are split to what each takes, with the same picture."""
    from sdrt.runtime import Pipeline
    from tests.serve.test_engine_modes import LimitedSession

    ask = dict(prompt=PROMPT, steps=3, seed=6, height=H, width=W, num_images=2, guidance=7.5, scheduler="euler",
               controls=[("edges", str(controlled["pictures"][0]), 0.9)])
    want = Pipeline(controlled["engine"]).generate(**ask).images
    pipe = Pipeline(controlled["engine"])
    pipe._load_lazily(["controlnet/edges", "unet_control"])
    for comp, limit in (("controlnet/edges", 2), ("unet_control", 3)):
        pipe.sessions[comp] = LimitedSession(pipe.sessions[comp], limit)
    assert pipe.unet_batch_limit is None   # the plain UNet's (ONNX Runtime's): any batch
    got = pipe.generate(**ask).images
    assert pipe.sessions["controlnet/edges"].batches == [2, 2] * 3   # 2 guided images: 4 samples a step
    assert pipe.sessions["unet_control"].batches == [3, 1] * 3
    for a, b in zip(got, want):
        assert images_psnr(a, b) >= 60


def test_bad_controls_are_one_line(controlled, model_dirs, sd1_engine, tmp_path):
    from sdrt.runtime import Pipeline
    from tools.make_models import make_controlnet

    pipe = Pipeline(controlled["engine"])
    picture = controlled["pictures"][0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"no picture")
    cases = [
        (dict(controls=[("lines", picture)]), "no such ControlNet; it has edges, depth"),
        (dict(controls=[("edges", broken)]), "cannot be read"),
        (dict(controls=[("edges", picture, 2.5)]), "scale 2.5: must be a number in [0, 2]"),
        (dict(controls=[("edges", picture, 1.0, 0.8, 0.3)]), "start 0.8 must be below end 0.3"),
        (dict(guess_mode=True), "guess_mode: only ControlNets use it"),
        (dict(controls=["edges"]), "NAME:IMAGE"),
    ]
    for kw, needle in cases:
        with pytest.raises(UserError) as e:
            pipe.request(PROMPT, **kw)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(UserError, match="it has none"):
        Pipeline(sd1_engine).request(PROMPT, controls=[("edges", picture)])
    other = make_controlnet(model_dirs["sd2-tiny"], tmp_path / "sd2-net")
    assert_one_line_error(run_cli("export", controlled["model"], tmp_path / "e", "--controlnet", f"{other}:x"),
                          "sd2-net", "made for another model", "cross_attention_dim=64")


def test_generate_cli_takes_controls(controlled, tmp_path):
    out = tmp_path / "o.png"
    r = run_cli("generate", controlled["engine"], PROMPT, "-o", out, "-q", "--steps", "3", "--seed", "2",
                "--height", str(H), "--width", str(W), "--control", f"edges:{controlled['pictures'][0]}:0.7:0:0.5",
                "--control", f"depth:{controlled['pictures'][1]}")
    assert r.returncode == 0, r.stderr
    from sdrt.runtime import Pipeline

    want = Pipeline(controlled["engine"]).generate(
        PROMPT, steps=3, seed=2, height=H, width=W,
        controls=[("edges", controlled["pictures"][0], 0.7, 0, 0.5), ("depth", controlled["pictures"][1])]).images[0]
    assert images_psnr(np.asarray(Image.open(out).convert("RGB")), want) >= 60
    text = Image.open(out).text["parameters"]   # each control as AUTOMATIC1111's ControlNet extension writes it
    assert ('ControlNet 0: "Model: edges, Weight: 0.7, Guidance Start: 0, Guidance End: 0.5", '
            'ControlNet 1: "Model: depth, Weight: 1, Guidance Start: 0, Guidance End: 1"') in text
    assert_one_line_error(run_cli("generate", controlled["engine"], PROMPT, "--control", "lines:x.png"),
                          "controls 'lines'", "edges, depth")


def test_canny_finds_a_step_edge_once_and_ignores_flat_and_faint_areas():
    from sdrt.runtime.control import canny, preprocess

    picture = np.zeros((40, 60, 3), np.uint8)
    picture[10:30, 15:45] = 255            # a white box: a strong step all round
    picture[:, 50:] = 20                   # a faint step (gray 20 against 0): below the low threshold
    edges = canny(picture)[..., 0] > 0
    rows, cols = np.nonzero(edges)
    assert set(rows) <= set(range(8, 32)) and set(cols) <= set(range(13, 47))   # only around the box
    for r in range(12, 28):                # each side of the box: one thin line
        assert edges[r, 13:17].sum() == 1 and edges[r, 43:47].sum() == 1
    assert not edges[:, 48:].any() and not edges[15:25, 20:40].any()
    assert (canny(picture, 5, 10)[..., 0] > 0)[:, 48:].any()
    assert np.array_equal(preprocess(Image.fromarray(picture), "canny"), canny(picture))   # lower thresholds find it
    with pytest.raises(UserError, match="module 'depth'"):
        preprocess(picture, "depth")
