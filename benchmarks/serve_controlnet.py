"""The step-batching engine with ControlNets: 8 clients, half of them with a ControlNet, on the shapes model.

    .venv/bin/python benchmarks/serve_controlnet.py [--work build/serve-controlnet] [--requests 32] [--json F]

Exports models/shapes-32 with a small random ControlNet (tools/make_models.make_controlnet) if missing, then runs
closed loops against the engine in this process (no HTTP, so only the batching differs): each client sends its
next request when the last is answered, every other request with the ControlNet. Three runs: one client
(sequential), 8 clients with requests of every ControlNet set sharing each step's UNet call (sdrt's default),
and 8 clients with each set batched apart (Engine(share_controlnets=False)). Prints images/s of each.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def closed_loop(engine, asks: list[dict], clients: int) -> float:
    """images/s of ``asks`` answered by ``clients`` threads, each sending its next one when the last is done."""
    lock, issued = threading.Lock(), [0]

    def client():
        while True:
            with lock:
                if issued[0] >= len(asks):
                    return
                ask = asks[issued[0]]
                issued[0] += 1
            engine.submit(**ask).wait(600)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(asks) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(ROOT / "build" / "serve-controlnet"))
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from PIL import Image

    from sdrt.export import export_model
    from sdrt.runtime import Pipeline
    from sdrt.serve import Engine
    from tools.make_models import make_controlnet

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = ROOT / "models" / "shapes-32"
    net, engine_dir = work / "controlnet", work / "engine"
    if not net.exists():
        make_controlnet(model, net, seed=1)
    if not engine_dir.exists():
        export_model(model, engine_dir, progress=False, log=lambda m: None, controlnets=[f"{net}:edges"])
    edges = np.zeros((32, 32, 3), np.uint8)
    edges[8:24, 8:24] = 255
    picture = Image.fromarray(edges)
    asks = [dict(prompt="a red circle on a blue background", steps=args.steps, seed=i, scheduler="ddim",
                 **({"controls": [("edges", picture, 0.8)]} if i % 2 else {})) for i in range(args.requests)]
    results = {}
    for label, clients, share in (("sequential", 1, True), ("8 clients, shared calls", 8, True),
                                  ("8 clients, batched by ControlNet set", 8, False)):
        pipe = Pipeline(engine_dir)
        engine = Engine(pipe, max_batch=8, share_controlnets=share).start()
        engine.submit(**asks[1]).wait(600)   # loads the ControlNet's sessions before timing
        try:
            results[label] = closed_loop(engine, asks, clients)
        finally:
            engine.close()
            pipe.close()
        print(f"{label:40s} {results[label]:.2f} images/s", flush=True)
    base = results["sequential"]
    print(f"shared / sequential {results['8 clients, shared calls'] / base:.2f}x; batched by set / sequential "
          f"{results['8 clients, batched by ControlNet set'] / base:.2f}x; shared / by set "
          f"{results['8 clients, shared calls'] / results['8 clients, batched by ControlNet set']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "images_per_s": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
