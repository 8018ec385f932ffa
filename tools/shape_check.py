"""Read back what a shapes picture shows: background color, object color, shape.

Used to check that a model trained by tools/train_shapes.py draws what its prompt asks for.

* background: the nearest named color to each of the four corner pixels, majority vote;
* object: the pixels far from the background (largest connected blob), their median's nearest named color;
* shape: the fill ratio of the blob's bounding box (square ~1.0, circle ~pi/4 = 0.785, triangle ~0.5).

    python -m tools.shape_check MODEL_DIR [--seeds 0 1] [--steps 25] [--guidance 7.5] [--out grid.png]
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys

import numpy as np

COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES = ("circle", "square", "triangle")
PROMPT_RE = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")

_NAMES = list(COLORS)
_RGB = np.array([COLORS[c] for c in _NAMES], dtype=np.float32)


def prompt(obj: str, shape: str, bg: str) -> str:
    return f"a {obj} {shape} on a {bg} background"


def all_prompts() -> list[str]:
    """The 90 prompts: 6 object colors x 3 shapes x 5 other background colors."""
    return [prompt(o, s, b) for o, s, b in itertools.product(_NAMES, SHAPES, _NAMES) if o != b]


def parse(text: str) -> dict:
    m = PROMPT_RE.match(text.strip())
    if not m:
        raise ValueError(f"not a shapes prompt: {text!r}")
    return dict(object=m.group(1), shape=m.group(2), background=m.group(3))


def nearest_color(rgb) -> str:
    d = ((_RGB - np.asarray(rgb, dtype=np.float32)) ** 2).sum(-1)
    return _NAMES[int(d.argmin())]


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_n, cur = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        cur += 1
        labels[y0, x0] = cur
        stack, n = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            n += 1
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = cur
                    stack.append((yy, xx))
        if n > best_n:
            best, best_n = cur, n
    return labels == best if best else np.zeros_like(mask)


def object_mask(image) -> tuple[str, np.ndarray]:
    """(background color, the object's pixels): the corners' majority color, and the largest blob of pixels far
    from it (more than half the smallest distance between two named colors, 255)."""
    img = np.asarray(image).astype(np.float32)
    corners = [img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]]
    votes = [nearest_color(c) for c in corners]
    background = max(set(votes), key=votes.count)
    dist = np.sqrt(((img - np.array(COLORS[background], dtype=np.float32)) ** 2).sum(-1))
    return background, _largest_blob(dist > 128.0)


def classify(image) -> dict:
    """``image``: HxWx3 uint8 -> dict(background=color, object=color|None, shape=shape|None, fill=float)."""
    img = np.asarray(image).astype(np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {img.shape}")
    background, blob = object_mask(img)
    if blob.sum() < 4:
        return dict(background=background, object=None, shape=None, fill=0.0)
    obj_rgb = np.median(img[blob], axis=0)
    obj = nearest_color(obj_rgb)
    ys, xs = np.nonzero(blob)
    area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = float(blob.sum() / area)
    shape = "square" if fill > 0.89 else "circle" if fill > 0.64 else "triangle"
    return dict(background=background, object=obj, shape=shape, fill=fill)


def score_details(prompts, images) -> dict:
    """Per-field and all-three accuracies, and the per-image readings."""
    rows, n_ok = [], {"background": 0, "object": 0, "shape": 0, "all": 0}
    for text, img in zip(prompts, images, strict=True):
        want, got = parse(text), classify(img)
        ok = {k: got[k] == want[k] for k in ("background", "object", "shape")}
        ok["all"] = all(ok.values())
        for k, v in ok.items():
            n_ok[k] += int(v)
        rows.append(dict(prompt=text, got=got, ok=ok["all"]))
    n = max(len(rows), 1)
    return dict(accuracy=n_ok["all"] / n, **{f"{k}_accuracy": n_ok[k] / n for k in ("background", "object", "shape")},
                n=len(rows), rows=rows)


def score(prompts, images) -> float:
    """Fraction of images whose background color, object color and shape all match their prompt."""
    return score_details(prompts, images)["accuracy"]


def eval_prompts(n: int = 24) -> list[str]:
    """``n`` prompts spread over all colors, shapes and backgrounds (deterministic)."""
    ps = all_prompts()
    step = len(ps) / n
    return [ps[int(i * step)] for i in range(n)]


def generate(model_dir: str, prompts, seeds, steps: int = 25, guidance: float = 7.5, scheduler: str | None = None):
    """Images (uint8 HxWx3) from diffusers' StableDiffusionPipeline, one per (prompt, seed)."""
    import torch
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif scheduler == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out_p, out_i = [], []
    for seed in seeds:
        gens = [torch.Generator("cpu").manual_seed(seed) for _ in prompts]
        imgs = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                    output_type="np").images
        out_p += list(prompts)
        out_i += [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in imgs]
    return out_p, out_i


def save_grid(images, path: str, cols: int = 12, scale: int = 3) -> None:
    from PIL import Image

    h, w = images[0].shape[:2]
    rows = (len(images) + cols - 1) // cols
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 128, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = im
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Generate shapes with diffusers and score them")
    ap.add_argument("model_dir")
    ap.add_argument("--n-prompts", type=int, default=24)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--scheduler", choices=("ddim", "euler"), default=None, help="default: the model's own")
    ap.add_argument("--out", default=None, help="write a grid PNG of the generated images")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    prompts, images = generate(args.model_dir, eval_prompts(args.n_prompts), args.seeds, args.steps,
                               args.guidance, args.scheduler)
    d = score_details(prompts, images)
    if args.verbose:
        for r in d["rows"]:
            print(("ok  " if r["ok"] else "BAD ") + r["prompt"], r["got"])
    print(f"images {d['n']}  accuracy {d['accuracy']:.3f}  background {d['background_accuracy']:.3f}  "
          f"object {d['object_accuracy']:.3f}  shape {d['shape_accuracy']:.3f}")
    if args.out:
        save_grid(images, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
