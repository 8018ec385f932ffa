"""`sdrt bench` output: a Markdown table and a PNG plot (stage times side by side; per-step latent error)."""

from __future__ import annotations

import os

STAGES = (("text_encoder_ms", "text encoder (ms)"), ("unet_step_ms", "UNet step (ms)"),
          ("vae_decode_ms", "VAE decode (ms)"))


def _f(x, digits=1):
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(result: dict) -> str:
    s, env = result["settings"], result["environment"]
    lines = [
        f"sdrt bench: {s['height']}x{s['width']}, batch {s['batch']}, {s['steps']} steps, guidance {s['guidance']}, "
        f"{s['runs']} runs after {s['warmup']} warm-up; {env['cpu']} ({env['cpus']} CPUs, {env['threads']} threads)",
        "",
        "| side | backend | load s | text encoder ms p50/p90 | UNet step ms p50/p90 | VAE decode ms p50/p90 "
        "| end-to-end s p50/p90 | images/s | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        cells = [f"{_f(r[k]['p50'])} / {_f(r[k]['p90'])}" for k, _ in STAGES]
        e2e = r["end_to_end_s"]
        lines.append(f"| {r['name']} | {r['backend']} | {_f(r['load_s'], 2)} | {' | '.join(cells)} | "
                     f"{_f(e2e['p50'], 2)} / {_f(e2e['p90'], 2)} | {_f(r['images_per_s'], 3)} | {_f(r['peak_rss_mb'], 0)} |")
    if result.get("ratio"):
        q = result["ratio"]
        lines += ["", f"sdrt / diffusers (p50): UNet step {q['unet_step']:.3f}, end-to-end {q['end_to_end']:.3f}, "
                      f"text encoder {q['text_encoder']:.3f}, VAE decode {q['vae_decode']:.3f}"]
    p = result.get("parity")
    if p:
        comps = ", ".join(f"{c} rel L2 {p[c]['rel_l2']:.2e} (max abs {p[c]['max_abs']:.2e})"
                          for c in ("text_encoder", "unet", "vae_decoder"))
        steps = p["latent_rel_l2_per_step"]
        psnr = "identical images" if p.get("image_psnr_db") is None else f"image PSNR {p['image_psnr_db']:.1f} dB"
        lines += ["", f"parity: {comps}; {psnr}; "
                      f"latent rel L2 after step 1 {steps[0]:.2e}, after the last {steps[-1]:.2e}"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | os.PathLike) -> None:
    """Stage times side by side, and the per-step latent error curve when parity was measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from sdrt.errors import MissingDependencyError

        raise MissingDependencyError("matplotlib", "bench", "needed by --plot") from None
    parity = result.get("parity")
    fig, axes = plt.subplots(1, 2 if parity else 1, figsize=(11 if parity else 6, 4), squeeze=False)
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
    ax.legend(fontsize=8)
    if parity:
        ax2 = axes[0][1]
        errs = parity["latent_rel_l2_per_step"]
        ax2.semilogy(range(1, len(errs) + 1), errs, marker="o")
        ax2.set_xlabel("UNet call (PNDM repeats its first timestep)" if len(errs) > s["steps"] else "step")
        ax2.set_ylabel("latent relative L2, sdrt vs diffusers")
        ax2.set_title("identical images" if parity.get("image_psnr_db") is None
                      else f"image PSNR {parity['image_psnr_db']:.1f} dB")
    fig.tight_layout()
    from sdrt.runtime.files import atomic_path

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
