"""`sdrt bench` output on a made-up result: step counts as the scheduler makes them, a plot that can be read."""

from __future__ import annotations

import pytest

from sdrt.bench.report import figure, markdown
from sdrt.runtime.schedulers import steps_phrase


def _stage(p50):
    return {"p50": p50, "p90": p50 * 1.1}


def _result(steps=4, unet_calls=5, evaluations=5, reference_is_source=True):
    """PNDM with 4 steps: 5 UNet evaluations, the UNet the tallest bar by far."""
    run = {"backend": "onnxruntime (2 threads)", "load_s": 1.0, "images_per_s": 0.04, "peak_rss_mb": 5400,
           "gpu_peak_mb": None, "unet_calls": unet_calls, "text_encoder_ms": _stage(300),
           "unet_step_ms": _stage(4000), "vae_decode_ms": _stage(900), "end_to_end_s": _stage(26)}
    return {
        "environment": {"cpu": "AMD EPYC", "cpus": 2, "threads": 2},
        "settings": {"height": 512, "width": 512, "batch": 1, "steps": steps, "guidance": 7.5, "runs": 2,
                     "warmup": 1, "reference": "models/sd15", "reference_is_source": reference_is_source},
        "runs": [dict(run, name="sdrt"), dict(run, name="diffusers", backend="diffusers cpu float32")],
        "ratio": {"unet_step": 0.55, "end_to_end": 0.55, "text_encoder": 0.5, "vae_decode": 0.57},
        "parity": {c: {"rel_l2": 1e-6, "max_abs": 1e-5} for c in ("text_encoder", "unet", "vae_decoder")}
        | {"image_psnr_db": 89.6, "images_identical": False,
           "latent_rel_l2_per_step": [1e-6 * (i + 1) for i in range(evaluations)]},
    }


def test_steps_and_unet_evaluations_are_both_said_where_they_differ():
    assert steps_phrase(25, 25) == "25 steps"
    assert steps_phrase(25, 26) == "25 steps (26 UNet evaluations)"
    assert steps_phrase(25, 49) == "25 steps (49 UNet evaluations)"
    md = markdown(_result())
    assert md.startswith("sdrt bench: 512x512, batch 1, 4 steps (5 UNet evaluations), guidance 7.5")
    assert "UNet evaluation ms p50/p90" in md and "UNet step" not in md
    assert "not the checkpoint the engine was exported from" not in md


def test_a_reference_compared_anyway_is_flagged_in_the_table():
    md = markdown(_result(reference_is_source=False))
    assert "models/sd15 is not the checkpoint the engine was exported from (--allow-other-reference)" in md


@pytest.fixture()
def drawn():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    fig = figure(_result(steps=4, evaluations=5))
    fig.canvas.draw()
    yield fig
    plt.close(fig)


def test_the_legend_covers_no_bar(drawn):
    bars_ax = drawn.axes[0]
    (legend,) = drawn.legends
    box = legend.get_window_extent()
    bars = [patch.get_window_extent() for patch in bars_ax.patches]
    assert len(bars) == 6
    assert not any(box.overlaps(bar) for bar in bars)


def test_the_parity_plot_counts_whole_unet_evaluations(drawn):
    ax = drawn.axes[1]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert ax.get_xlabel() == "UNet evaluation (4 steps)"
