"""`sdrt bench` on a tiny model: structure and self-consistency of what it reports (not speed)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bench_run(sd1_engine, sd1_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    r = run_cli("bench", sd1_engine, "--reference", sd1_model, "--steps", 3, "--runs", 2, "--warmup", 1,
                "--batch", 2, "--scheduler", "euler_a", "--json", out / "b.json", "--markdown", out / "b.md",
                "--plot", out / "b.png", "-q", timeout=600)
    assert r.returncode == 0, r.stderr
    return r, out


def test_json_has_the_documented_keys(bench_run):
    _, out = bench_run
    result = json.loads((out / "b.json").read_text())
    assert set(result) >= {"environment", "settings", "runs", "ratio", "parity"}
    assert [r["name"] for r in result["runs"]] == ["sdrt", "diffusers"]
    for r in result["runs"]:
        for key in ("text_encoder_ms", "unet_step_ms", "vae_decode_ms", "end_to_end_s"):
            assert 0 < r[key]["p50"] <= r[key]["p90"], (r["name"], key)
        assert r["load_s"] > 0 and r["peak_rss_mb"] > 50
        # images/s is the batch over the median end-to-end time
        assert r["images_per_s"] == pytest.approx(2 / r["end_to_end_s"]["p50"])
        # a step cannot take longer than a whole image
        assert r["unet_step_ms"]["p50"] < r["end_to_end_s"]["p90"] * 1e3
    sdrt, ref = result["runs"]
    assert result["ratio"]["unet_step"] == pytest.approx(sdrt["unet_step_ms"]["p50"] / ref["unet_step_ms"]["p50"])
    assert result["ratio"]["end_to_end"] == pytest.approx(sdrt["end_to_end_s"]["p50"] / ref["end_to_end_s"]["p50"])
    assert result["settings"]["steps"] == 3 and result["settings"]["batch"] == 2


def test_parity_is_measured_in_the_same_run(bench_run):
    _, out = bench_run
    p = json.loads((out / "b.json").read_text())["parity"]
    for comp in ("text_encoder", "unet", "vae_decoder"):
        assert 0 < p[comp]["rel_l2"] <= 1e-4, comp
    assert len(p["latent_rel_l2_per_step"]) == 3
    assert all(0 <= e < 1e-3 for e in p["latent_rel_l2_per_step"])
    assert p["images_identical"] or p["image_psnr_db"] >= 40


def test_markdown_and_plot_are_written(bench_run):
    r, out = bench_run
    md = (out / "b.md").read_text()
    assert md == r.stdout
    assert "| sdrt |" in md and "| diffusers |" in md
    # the report names the image PSNR, or says the images are identical (PSNR infinite: recorded as null)
    assert ("image PSNR" in md) != ("identical images" in md)
    png = (out / "b.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_bad_options_are_one_line(sd1_engine, tmp_path):
    r = run_cli("bench", sd1_engine, "--height", 33, "-q")
    assert r.returncode != 0 and "--height 33" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("bench", sd1_engine, "--reference", tmp_path, "-q")
    assert r.returncode != 0 and "model_index.json" in r.stderr


def test_missing_output_folder_is_refused_before_running(sd1_engine, tmp_path):
    r = run_cli("bench", sd1_engine, "--json", tmp_path / "nope" / "b.json", "-q")
    assert r.returncode != 0 and "--json" in r.stderr and len(r.stderr.strip().splitlines()) == 1
