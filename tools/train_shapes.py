"""Train a small Stable Diffusion on generated pictures of simple shapes, on the CPU, in the diffusers layout.

Pictures: 32x32, "a {color} {shape} on a {color} background" (red green blue yellow white black; circle square
triangle; object color != background color), the object one solid color, 2+ px from every edge, varied size
and position. Real diffusers/transformers classes (AutoencoderKL, CLIPTextModel with the real CLIP vocabulary,
UNet2DConditionModel with cross-attention, SD's scaled_linear betas with DDIM, epsilon prediction).

Stage 1 trains the VAE (L1 + MSE reconstruction + a small KL), sets scaling_factor = 1/std(latents) as SD does;
stage 2 trains the text encoder and the UNet together on the VAE's latents with the noise-prediction objective,
10% empty prompts (classifier-free guidance), an EMA of the weights (the EMA is what is saved).
Everything is seeded; one CPU thread.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python -m tools.train_shapes models/shapes-32
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from tools.clip_vocab import EOS, write_clip_tokenizer
from tools.make_models import SD1_SCHEDULER
from tools.shape_check import COLORS, SHAPES, prompt

# SD1's scheduler settings (the betas the UNet trains with), DDIM as the default sampler: PNDM at guidance
# 7.5 oversaturates this small model.
SCHEDULER = {**SD1_SCHEDULER, "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0",
             "prediction_type": "epsilon"}
COLOR_NAMES = list(COLORS)
PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32) / 127.5 - 1.0  # in [-1, 1]


def render(rng: np.random.Generator, n: int, size: int = 32, margin: int = 2, min_side: int = 9, max_side: int = 22):
    """``n`` random pictures: float32 (n, 3, size, size) in [-1, 1], and (object, shape, background) indices."""
    obj = rng.integers(0, 6, n)
    bg = (obj + rng.integers(1, 6, n)) % 6  # any other color, uniformly
    shape = rng.integers(0, 3, n)
    side = rng.integers(min_side, max_side + 1, n)
    x0 = margin + (rng.random(n) * (size - 2 * margin - side + 1)).astype(int)
    y0 = margin + (rng.random(n) * (size - 2 * margin - side + 1)).astype(int)
    c = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    px, py = c[None, None, :], c[None, :, None]
    s, xs, ys = side[:, None, None].astype(np.float32), x0[:, None, None], y0[:, None, None]
    inbox = (px >= xs) & (px < xs + s) & (py >= ys) & (py < ys + s)
    circle = (px - xs - s / 2) ** 2 + (py - ys - s / 2) ** 2 <= (s / 2) ** 2
    # upright isosceles triangle: apex at the top middle, base the bottom edge of the box
    triangle = inbox & (np.abs(px - xs - s / 2) <= (py - ys) / 2)
    sh = shape[:, None, None]
    mask = np.where(sh == 0, circle, np.where(sh == 1, inbox, triangle))
    img = np.where(mask[:, None], PALETTE[obj][:, :, None, None], PALETTE[bg][:, :, None, None])
    return img.astype(np.float32), np.stack([obj, shape, bg], 1)


def label_prompt(lbl) -> str:
    return prompt(COLOR_NAMES[lbl[0]], SHAPES[lbl[1]], COLOR_NAMES[lbl[2]])


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def build(args):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        hidden_size=args.text_hidden, intermediate_size=args.text_hidden * 2, num_hidden_layers=args.text_layers,
        num_attention_heads=4, hidden_act="quick_gelu", projection_dim=args.text_hidden)
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(
        sample_size=args.size // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(args.unet_channels),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=args.text_hidden, attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=32, sample_size=args.size, scaling_factor=1.0)
    return text_encoder, unet, vae


def log(fh, **kw):
    line = json.dumps(kw)
    print(line, flush=True)
    fh.write(line + "\n")
    fh.flush()


def train_vae(vae, args, logf):
    import torch

    rng = np.random.default_rng(args.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    hist, t0 = [], time.time()
    vae.train()
    for step in range(args.vae_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 100)
        x = torch.from_numpy(render(rng, args.vae_batch, args.size)[0])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        l1, mse = (rec - x).abs().mean(), (rec - x).pow(2).mean()
        kl = post.kl().mean() / (3 * args.size * args.size)  # per pixel
        loss = l1 + mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        hist.append((step, float(mse), float(kl)))
        if step % 50 == 0 or step == args.vae_steps - 1:
            log(logf, stage="vae", step=step, l1=round(float(l1), 5), mse=round(float(mse), 6),
                kl=round(float(kl), 4), s=round(time.time() - t0, 1))
        if time.time() - t0 > args.vae_max_s:
            log(logf, stage="vae", note=f"time guard: stopped after {step + 1} steps")
            break
    vae.eval()
    return hist, time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--vae-steps", type=int, default=1000)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-4)
    ap.add_argument("--vae-max-s", type=float, default=600, help="time guard for stage 1 (seconds)")
    ap.add_argument("--n-latents", type=int, default=32768, help="pictures encoded once for stage 2")
    ap.add_argument("--steps", type=int, default=3000, help="UNet + text encoder steps")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--cfg-dropout", type=float, default=0.1)
    ap.add_argument("--offset-noise", type=float, default=0.1)
    ap.add_argument("--max-s", type=float, default=2100, help="time guard for stage 2 (seconds)")
    ap.add_argument("--text-hidden", type=int, default=64)
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--unet-channels", type=int, nargs=2, default=[48, 96])
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out_dir = Path(args.out_dir)
    work = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logf = open(work / "train_log.jsonl", "w")
    log(logf, args=vars(args), torch=torch.__version__)
    t_start = time.time()

    text_encoder, unet, vae = build(args)
    n_par = {k: sum(p.numel() for p in m.parameters()) for k, m in
             (("text_encoder", text_encoder), ("unet", unet), ("vae", vae))}
    log(logf, params=n_par)

    # ---- stage 1: VAE
    vae_hist, vae_s = train_vae(vae, args, logf)

    # ---- encode a fixed set of pictures once (posterior mean and std; a fresh sample is drawn per step)
    rng = np.random.default_rng(args.seed + 2)
    imgs, labels = render(rng, args.n_latents, args.size)
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, args.n_latents, 256):
            d = vae.encode(torch.from_numpy(imgs[i : i + 256])).latent_dist
            means.append(d.mean)
            stds.append(d.std)
        mean, std = torch.cat(means), torch.cat(stds)
        gen = torch.Generator().manual_seed(args.seed + 3)
        sample = mean + std * torch.randn(mean.shape, generator=gen)
        latent_std = float(sample.std())
        # reconstruction error of the posterior mean on the first 512 pictures
        rec = vae.decode(mean[:512]).sample
        rec_mse = float((rec - torch.from_numpy(imgs[:512])).pow(2).mean())
    scaling_factor = 1.0 / latent_std
    vae.register_to_config(scaling_factor=scaling_factor)
    log(logf, stage="latents", n=args.n_latents, latent_std=latent_std, scaling_factor=scaling_factor,
        latent_mean=float(sample.mean()), vae_eval_mse=rec_mse)
    del imgs

    # ---- tokenizer and the prompt table
    write_clip_tokenizer(work / "tokenizer", pad_token=EOS)
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    lbl_keys = labels[:, 0] * 18 + labels[:, 1] * 6 + labels[:, 2]
    table_prompts = [label_prompt((k // 18, (k // 6) % 3, k % 6)) for k in range(108)] + [""]
    ids = tokenizer(table_prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty_id = 108
    lbl_keys = torch.from_numpy(lbl_keys)

    # ---- stage 2: text encoder + UNet
    noise_sched = DDPMScheduler.from_config(SCHEDULER)
    acp = noise_sched.alphas_cumprod
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_te, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    ema_params = list(ema_te.parameters()) + list(ema_unet.parameters())
    for p in ema_params:
        p.requires_grad_(False)
    text_encoder.train()
    unet.train()
    gen = torch.Generator().manual_seed(args.seed + 4)
    hist, t0, avg = [], time.time(), None
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, args.n_latents, (args.batch,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling_factor
        keys = lbl_keys[idx].clone()
        keys[torch.rand(args.batch, generator=gen) < args.cfg_dropout] = empty_id
        noise = torch.randn(z0.shape, generator=gen)
        if args.offset_noise:
            noise = noise + args.offset_noise * torch.randn(z0.shape[0], z0.shape[1], 1, 1, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        hidden = text_encoder(ids[keys])[0]
        pred = unet(zt, t, hidden).sample
        loss = (pred - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        avg = float(loss) if avg is None else 0.98 * avg + 0.02 * float(loss)
        hist.append((step, float(loss), avg))
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - t0
            log(logf, stage="unet", step=step, loss=round(float(loss), 5), loss_avg=round(avg, 5),
                lr=round(lr, 7), s=round(el, 1), eta_s=round(el / (step + 1) * (args.steps - step - 1)))
        if time.time() - t0 > args.max_s:
            log(logf, stage="unet", note=f"time guard: stopped after {step + 1} steps")
            break
    unet_s = time.time() - t0

    # ---- save in the diffusers layout
    ema_te.eval()
    ema_unet.eval()
    scheduler = DDIMScheduler.from_config(SCHEDULER)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=ema_te, tokenizer=tokenizer, unet=ema_unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(work, safe_serialization=True)
    shutil.rmtree(work / "tokenizer")
    write_clip_tokenizer(work / "tokenizer", pad_token=EOS)
    (work / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))

    # ---- loss curves
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    vh = np.array(vae_hist)
    axes[0].semilogy(vh[:, 0], vh[:, 1], lw=0.6, label="reconstruction MSE")
    axes[0].semilogy(vh[:, 0], vh[:, 2] * args.kl_weight, lw=0.6, label=f"KL per pixel x {args.kl_weight:g}")
    axes[0].set_title(f"VAE ({len(vae_hist)} steps, batch {args.vae_batch}, {vae_s:.0f} s)")
    axes[0].set_xlabel("step")
    axes[0].legend()
    uh = np.array(hist)
    axes[1].semilogy(uh[:, 0], uh[:, 1], lw=0.3, alpha=0.5, label="noise-prediction MSE")
    axes[1].semilogy(uh[:, 0], uh[:, 2], lw=1.2, label="running mean")
    axes[1].set_title(f"text encoder + UNet ({len(hist)} steps, batch {args.batch}, {unet_s:.0f} s)")
    axes[1].set_xlabel("step")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(work / "loss_curves.png", dpi=100)

    summary = dict(
        params=n_par, vae_steps=len(vae_hist), vae_seconds=round(vae_s, 1),
        vae_final_mse=float(np.mean(vh[-50:, 1])), vae_final_kl=float(np.mean(vh[-50:, 2])), vae_eval_mse=rec_mse,
        scaling_factor=scaling_factor, unet_steps=len(hist), unet_seconds=round(unet_s, 1),
        unet_final_loss=float(np.mean(uh[-200:, 1])), total_seconds=round(time.time() - t_start, 1),
        args=vars(args), torch=torch.__version__)
    (work / "train_summary.json").write_text(json.dumps(summary, indent=2))
    log(logf, summary=summary)
    logf.close()
    if out_dir.exists():
        # keep a hand-written model card across retraining
        card = out_dir / "README.md"
        if card.exists():
            shutil.copy(card, work / "README.md")
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)
    print(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
