"""`sdrt bench` on a tiny model: structure and self-consistency of what it reports (not speed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, run_cli

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
    assert result["settings"]["reference_is_source"] is True
    assert [r["unet_calls"] for r in result["runs"]] == [3, 3]  # euler_a: one UNet evaluation per step


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
    assert ("image PSNR" in md) != ("identical images" in md)  # the tiny model's images are often identical
    assert "sdrt bench: 32x32, batch 2, 3 steps, guidance 7.5" in md  # euler_a: no UNet evaluations to add
    png = (out / "b.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    mask = os.umask(0)
    os.umask(mask)
    for name in ("b.png", "b.json", "b.md"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    assert sorted(p.name for p in out.iterdir()) == ["b.json", "b.md", "b.png"]  # no temporaries left


@pytest.mark.parametrize("args, needles", [
    (["--height", "33"], ["--height 33"]),
    (["--threads", "0"], ["--threads 0", ">= 1"]),
    (["--plot", "x.jpg"], ["--plot 'x.jpg'", ".png"]),
    (["--scheduler", "eular"], ["--scheduler 'eular'", "euler_a"]),  # before any worker starts
    (["--reference", "/"], ["--reference '/'", "model_index.json"]),
])
def test_bad_options_are_one_line(sd1_engine, args, needles):
    r = run_cli("bench", sd1_engine, *args, "-q")
    assert_one_line_error(r, *needles)
    assert "bench worker" not in r.stderr and "Error:" not in r.stderr


def test_a_reference_the_engine_was_not_exported_from_is_refused(sd1_engine, sd1_model, tmp_path):
    import shutil

    from sdrt.bench.runner import check_reference
    from sdrt.errors import SdrtWarning
    from sdrt.runtime.manifest import Manifest

    other = tmp_path / "other"
    shutil.copytree(sd1_model, other)
    config = other / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), beta_end=0.02)))
    r = run_cli("bench", sd1_engine, "--reference", other, "-q")
    assert_one_line_error(r, f"--reference '{other}'", "source.config_sha256", "--allow-other-reference")
    manifest = Manifest.load(sd1_engine)
    assert check_reference(manifest, str(sd1_model)) is True
    with pytest.warns(SdrtWarning, match="comparing anyway"):
        assert check_reference(manifest, str(other), allow_other=True) is False


def test_threads_reach_the_openvino_backend(sd1_engine):
    """The header says N threads: OpenVINO ran on all cores whatever --threads said."""
    pytest.importorskip("openvino")
    from sdrt.bench.worker import SdrtSide

    side = SdrtSide(str(sd1_engine), "openvino", 1)
    assert side.pipe.backend.compile_config()["INFERENCE_NUM_THREADS"] == 1
    assert side.backend == "openvino CPU f32 (1 threads)"


def test_a_worker_that_cannot_load_says_why_in_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "sdrt.bench.worker", "sdrt", str(tmp_path / "none"), "--scratch",
                        str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"engine directory '{tmp_path / 'none'}' does not exist; "
                                             "make one with `sdrt export`"]


def test_missing_output_folder_is_refused_before_running(sd1_engine, tmp_path):
    r = run_cli("bench", sd1_engine, "--json", tmp_path / "nope" / "b.json", "-q")
    assert r.returncode != 0 and "--json" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bench_stopped_with_sigterm_leaves_no_folder_and_no_worker(sd1_engine, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "sdrt", "bench", str(sd1_engine), "--runs", "100000", "-q"],
                            cwd=ROOT, env=dict(os.environ, TMPDIR=str(scratch_root)), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list(scratch_root.glob("sdrt-bench-*/*-image.npy")):
        time.sleep(0.05)  # until the worker runs and has written into the scratch folder
    assert proc.poll() is None, proc.communicate()[1]
    (scratch,) = scratch_root.glob("sdrt-bench-*")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines() == ["sdrt bench: terminated"]
    assert not scratch.exists()
    workers = [p for p in Path("/proc").iterdir() if p.name.isdigit()
               and str(scratch).encode() in _cmdline(p)]
    assert workers == []


def _cmdline(proc_dir) -> bytes:
    try:
        return (proc_dir / "cmdline").read_bytes()
    except OSError:  # the process ended meanwhile
        return b""


def test_long_weighted_prompts_and_embeddings_keep_parity(sd1_engine, sd1_model, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
              tmp_path / "easyneg.safetensors")
    prompt = "a (red circle:1.3) BREAK " + ", ".join(["a [blue] square on a green background"] * 12)
    r = run_cli("bench", sd1_engine, "--reference", sd1_model, "--steps", 2, "--runs", 1, "--warmup", 0,
                "--prompt", prompt, "--negative-prompt", "(easyneg:1.2), blurry",
                "--embedding", tmp_path / "easyneg.safetensors", "--json", tmp_path / "b.json", "-q", timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["settings"]["embeddings"] == [str(tmp_path / "easyneg.safetensors")]
    p = result["parity"]
    # diffusers got AUTOMATIC1111's reading of the 3-chunk prompt (sdrt.bench.reference): the same image
    assert p["images_identical"] or p["image_psnr_db"] >= 40
    assert all(0 <= e < 1e-3 for e in p["latent_rel_l2_per_step"])
