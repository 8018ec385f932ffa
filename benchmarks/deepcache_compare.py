"""sdrt's feature caching against DeepCache's own implementation (``pip install --no-deps deepcache``: its
DeepCacheSDHelper wraps a diffusers StableDiffusionPipeline), same checkpoint, seeds, interval and branch.

    python benchmarks/deepcache_compare.py ENGINE_DIR MODEL_DIR [--intervals 2 3 5] [--steps 25] --out F.json

ENGINE_DIR must hold the pair (`sdrt export --cache-branch B`); B is passed to DeepCache as cache_branch_id.
Reports, per interval, the image PSNR of sdrt against DeepCache (the same method: high), and of each against
its own uncached fp32 picture (what caching costs, by both implementations).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine_dir")
    ap.add_argument("model_dir")
    ap.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=12, help="how many shapes prompts (tools/shape_check.py)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch
    from DeepCache import DeepCacheSDHelper

    from sdrt.bench.reference import diffusers_pipeline
    from sdrt.runtime import Pipeline
    from sdrt.runtime.images import images_psnr
    from tools.shape_check import eval_prompts

    prompts = eval_prompts(args.prompts)
    ref = diffusers_pipeline(args.model_dir)
    ref.set_progress_bar_config(disable=True)
    branch = json.loads((Path(args.engine_dir) / "sdrt.json").read_text())["feature_cache"]["branch"]

    def diffusers_images():
        out = ref(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(args.seed)).images
        return [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in out]

    def sdrt_images(interval):
        pipe = Pipeline(args.engine_dir, cache_interval=interval)
        return pipe.generate(prompts, steps=args.steps, guidance=args.guidance, seed=args.seed).images

    def psnr(a, b):
        values = [images_psnr(x, y) for x, y in zip(a, b)]
        finite = [v for v in values if np.isfinite(v)]
        return {"mean_db": float(np.mean(finite)) if finite else None, "min_db": float(min(values)),
                "identical": len(values) - len(finite)}

    base_d, base_s = diffusers_images(), sdrt_images(None)
    rows = [{"interval": None, "sdrt_vs_diffusers": psnr(base_s, base_d)}]
    helper = DeepCacheSDHelper(pipe=ref)
    for n in args.intervals:
        helper.set_params(cache_interval=n, cache_branch_id=branch)
        helper.enable()
        t0 = time.perf_counter()
        dc = diffusers_images()
        dc_s = time.perf_counter() - t0
        helper.disable()
        ours = sdrt_images(n)
        rows.append({"interval": n, "sdrt_vs_deepcache": psnr(ours, dc), "sdrt_vs_own_fp32": psnr(ours, base_s),
                     "deepcache_vs_own_fp32": psnr(dc, base_d), "deepcache_s": dc_s})
        print(json.dumps(rows[-1]), file=sys.stderr)
    result = {"engine_dir": args.engine_dir, "model_dir": args.model_dir, "branch": branch, "prompts": len(prompts),
              "steps": args.steps, "guidance": args.guidance, "seed": args.seed, "rows": rows,
              "command": "python benchmarks/deepcache_compare.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
