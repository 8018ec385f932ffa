"""Train a tiny VAE (AutoencoderTiny, the TAESD architecture) for the shapes model, distilled from its VAE.

The decoder learns to draw the picture from the latents the diffusion model works in (the full VAE's
posterior samples times its scaling_factor: the tiny VAE's own scaling_factor is 1.0, as TAESD's is); the
encoder learns the full encoder's scaled posterior mean. Pictures are drawn fresh each step by the shapes
renderer (tools/train_shapes.py), so nothing is stored but the weights.

    python -m tools.train_tiny_vae models/shapes-32 models/shapes-32-tiny-vae [--steps 1500] [--max-s 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def tiny_config(vae_config: dict, channels: int, encoder_channels: int) -> dict:
    """An AutoencoderTiny config with the full VAE's latent channels and scale factor."""
    levels = len(vae_config["block_out_channels"])   # scale factor 2 ** (levels - 1), as the full VAE's
    return dict(in_channels=vae_config["in_channels"], out_channels=vae_config["out_channels"],
                latent_channels=vae_config["latent_channels"], encoder_block_out_channels=[encoder_channels] * levels,
                decoder_block_out_channels=[channels] * levels, num_encoder_blocks=[1] * levels,
                num_decoder_blocks=[1] * levels, upsampling_scaling_factor=2, scaling_factor=1.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", help="the shapes checkpoint (its vae/ is the teacher)")
    ap.add_argument("out_dir", help="AutoencoderTiny folder to write (diffusers layout)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--channels", type=int, default=32, help="the decoder's channels at every level")
    ap.add_argument("--encoder-channels", type=int, default=16, help="the encoder's (sdrt exports only the decoder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-s", type=float, default=300, help="wall-clock guard: stop training after this long")
    ap.add_argument("--init", default=None, metavar="DIR", help="continue from this AutoencoderTiny's weights")
    args = ap.parse_args(argv)

    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    from tools.train_shapes import lr_at, render

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    teacher = AutoencoderKL.from_pretrained(Path(args.model_dir) / "vae").eval().requires_grad_(False)
    scaling = float(teacher.config.scaling_factor)
    tiny = (AutoencoderTiny.from_pretrained(args.init) if args.init else
            AutoencoderTiny(**tiny_config(dict(teacher.config), args.channels, args.encoder_channels)))
    opt = torch.optim.AdamW(tiny.parameters(), lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    log, t0 = [], time.time()
    step = 0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, 100)
        x = torch.from_numpy(render(rng, args.batch)[0])
        with torch.no_grad():
            post = teacher.encode(x).latent_dist
            z = post.sample() * scaling
            target_latents = post.mean * scaling
        rec = tiny.decoder(z)                      # in [-1, 1], as AutoencoderTiny.decode returns it
        dec_l1, dec_mse = (rec - x).abs().mean(), (rec - x).pow(2).mean()
        enc_mse = (tiny.encoder(x) - target_latents).pow(2).mean()
        loss = dec_l1 + dec_mse + enc_mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tiny.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            log.append(dict(step=step, decoder_l1=round(dec_l1.item(), 5), decoder_mse=round(dec_mse.item(), 6),
                            encoder_mse=round(enc_mse.item(), 6), s=round(time.time() - t0, 1)))
            print(json.dumps(log[-1]), file=sys.stderr)
        if time.time() - t0 > args.max_s:
            break
    train_s = time.time() - t0
    tiny.eval()
    # held-out pictures: the tiny decoder against the full one, both from the posterior mean
    x = torch.from_numpy(render(np.random.default_rng(args.seed + 1000), 256)[0])
    with torch.no_grad():
        z = teacher.encode(x).latent_dist.mean * scaling
        tiny_mse = float((tiny.decode(z).sample - x).pow(2).mean())
        full_mse = float((teacher.decode(z / scaling).sample - x).pow(2).mean())
    out = Path(args.out_dir)
    tiny.save_pretrained(out, safe_serialization=True)
    summary = dict(init=args.init, steps=step + 1, batch=args.batch, lr=args.lr,
                   channels=tiny.config.decoder_block_out_channels[0],
                   encoder_channels=tiny.config.encoder_block_out_channels[0], seed=args.seed,
                   threads=args.threads, train_s=round(train_s, 1),
                   params=sum(p.numel() for p in tiny.parameters()),
                   decoder_params=sum(p.numel() for p in tiny.decoder.parameters()),
                   held_out_mse_tiny_decoder=round(tiny_mse, 6), held_out_mse_full_decoder=round(full_mse, 6),
                   teacher=str(Path(args.model_dir) / "vae"), log=log)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
