"""`sdrt bench` output: a Markdown table and a PNG plot (stage times side by side; per-step latent error)."""

from __future__ import annotations

import os

STAGES = (("text_encoder_ms", "text encoder (ms)"), ("unet_step_ms", "UNet evaluation (ms)"),
          ("vae_decode_ms", "VAE decode (ms)"))


def _f(x, digits=1):
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(result: dict) -> str:
    from sdrt.runtime.schedulers import steps_phrase

    s, env = result["settings"], result["environment"]
    steps = steps_phrase(s["steps"], result["runs"][0].get("unet_calls", s["steps"]))
    lines = [
        f"sdrt bench: {s['height']}x{s['width']}, batch {s['batch']}, {steps}, guidance {s['guidance']}, "
        f"{s['runs']} runs after {s['warmup']} warm-up; {env['cpu']} ({env['cpus']} CPUs, {env['threads']} threads)",
        "",
        "| side | mode | backend | load s | text encoder ms p50/p90 | UNet evaluation ms p50/p90 | VAE decode ms p50/p90 "
        "| end-to-end s p50/p90 | images/s | peak RSS MB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        cells = [f"{_f(r[k]['p50'])} / {_f(r[k]['p90'])}" for k, _ in STAGES]
        e2e = r["end_to_end_s"]
        lines.append(f"| {r['name']} | {r.get('mode') or '—'} | {r['backend']} | {_f(r['load_s'], 2)} | {' | '.join(cells)} | "
                     f"{_f(e2e['p50'], 2)} / {_f(e2e['p90'], 2)} | {_f(r['images_per_s'], 3)} | {_f(r['peak_rss_mb'], 0)} |")
    if s.get("reference_is_source") is False:
        lines += ["", f"The reference {s['reference']} is not the checkpoint the engine was exported from "
                      "(--allow-other-reference): the ratios and parity below compare two different models."]
    q = result.get("ratio") or {}
    compare = f"sdrt:{s.get('compare_mode')}"
    for label, key in (("sdrt / diffusers", "unet_step"), (f"{compare} / sdrt", "compare_mode"),
                       (f"{compare} / diffusers", "compare_mode_vs_diffusers")):
        r = q if key == "unet_step" else q.get(key)
        if r and "unet_step" in r:
            lines += ["", f"{label} (p50): UNet evaluation {r['unet_step']:.3f}, end-to-end {r['end_to_end']:.3f}, "
                          f"text encoder {r['text_encoder']:.3f}, VAE decode {r['vae_decode']:.3f}"]
    p = result.get("parity")
    if p:
        comps = ", ".join(f"{c} rel L2 {p[c]['rel_l2']:.2e} (max abs {p[c]['max_abs']:.2e})"
                          for c in ("text_encoder", "unet", "vae_decoder"))
        errors = p["latent_rel_l2_per_step"]
        psnr = "identical images" if p.get("image_psnr_db") is None else f"image PSNR {p['image_psnr_db']:.1f} dB"
        lines += ["", f"parity: {comps}; {psnr}; latent rel L2 after the first UNet evaluation {errors[0]:.2e}, "
                      f"after the last {errors[-1]:.2e}"]
    return "\n".join(lines) + "\n"


def figure(result: dict):
    """Stage times side by side (the legend below, clear of the bars), and the latent error after each UNet
    evaluation when parity was measured; a matplotlib Figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        from sdrt.errors import MissingDependencyError

        raise MissingDependencyError("matplotlib", "bench", "needed by --plot") from None
    parity = result.get("parity")
    fig, axes = plt.subplots(1, 2 if parity else 1, figsize=(11 if parity else 6, 4.4), squeeze=False)
    ax = axes[0][0]
    runs = result["runs"]
    width = 0.8 / len(runs)
    for j, r in enumerate(runs):
        values = [r[k]["p50"] or 0 for k, _ in STAGES]
        xs = [i + j * width for i in range(len(STAGES))]
        ax.bar(xs, values, width, label=f"{r['name']} ({r['backend'][:30]})")
    ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(STAGES))], [t for _, t in STAGES])
    ax.set_ylabel("ms (p50)")
    s = result["settings"]
    ax.set_title(f"{s['height']}x{s['width']} batch {s['batch']}")
    fig.legend(*ax.get_legend_handles_labels(), loc="lower left", ncol=len(runs), fontsize=8, frameon=False)
    if parity:
        ax2 = axes[0][1]
        errs = parity["latent_rel_l2_per_step"]
        ax2.semilogy(range(1, len(errs) + 1), errs, marker="o")
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.set_xlabel("UNet evaluation" + (f" ({s['steps']} steps)" if len(errs) != s["steps"] else ""))
        ax2.set_ylabel("latent relative L2, sdrt vs diffusers")
        ax2.set_title("identical images" if parity.get("image_psnr_db") is None
                      else f"image PSNR {parity['image_psnr_db']:.1f} dB")
    fig.tight_layout(rect=(0, 0.06, 1, 1))  # the bottom strip is the legend's
    return fig


def plot(result: dict, path: str | os.PathLike) -> None:
    """Write :func:`figure` as a PNG."""
    from sdrt.runtime.files import atomic_path

    fig = figure(result)
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
