"""Load on `sdrt serve` over loopback: sequential requests against 2, 4 and 8 concurrent clients, and overload.

    .venv/bin/python benchmarks/serve_load.py ENGINE_DIR [--steps 25] [--size 32] [--requests 16]
                                              [--clients 1,2,4,8] [--overload] [--overhead-size 512]
                                              [--overhead-steps 25] [--json F]

Starts `sdrt serve ENGINE_DIR` on 127.0.0.1 (a free port) as a child process, and for each client count runs
a closed loop: every client sends its next request when the last one is answered, until `--requests`
requests are answered (each run bounded by `--max-seconds`). Reports images/s, p50/p99 latency, queue time
and mean UNet batch size (from the service's /metrics), and errors. Then:

* the UNet bound: the UNet alone, timed in this process on the same backend at the batch the engine formed in
  the 8-client run, gives the images/s a perfect batching engine would reach (per-sample time x UNet
  samples per image); the service's images/s is reported as a fraction of it;
* `--overload`: 32 clients against a second service started with `--max-queue 4`: only 200 and 429 may come
  back, and every request is answered;
* `--overhead-size S`: one request at S px: the client's latency minus the engine's own time (HTTP, JSON,
  PNG and base64), against that image's time;
* `--ray 1,2`: the same closed loops against the Ray Serve deployment (`sdrt serve --ray --replicas N`, a
  local Ray instance on loopback that the child process starts and stops) for each replica count, each
  replica with `--replica-cpus` CPUs (default: this machine's cores / N, so every run has the same cores);
  and the Ray proxy's added latency per request: the p50 of (client latency - engine time) over
  `--overhead-requests` one-step requests, through the proxy minus straight to `sdrt serve`.

Nothing but loopback is contacted; each run stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tools.ports import free_port  # noqa: E402


class Service:
    """`sdrt serve` in a child process, on a free loopback port, stopped with SIGTERM."""

    def __init__(self, engine_dir, *options, name: str = "sdrt serve"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.log = tempfile.TemporaryFile(mode="w+")  # the service's log (a pipe nobody reads would fill and block it)
        self.proc = subprocess.Popen([sys.executable, "-m", "sdrt", "serve", str(engine_dir), "--port",
                                      str(self.port), *map(str, options)],
                                     stdout=subprocess.DEVNULL, stderr=self.log, text=True, env=env, cwd=ROOT)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"{name} exited: {self.log.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} was not ready in 600 s")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def metrics(self) -> dict[str, float]:
        values = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def cpu_s(self) -> float | None:
        """CPU seconds the service process has used so far (Linux's /proc), or None where unknown."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def closed_loop(url: str, body: dict, clients: int, requests: int, max_seconds: float) -> dict:
    """`clients` threads, each sending its next request when the last is answered, `requests` in all.

    Each thread's httpx.Client is made before the clock starts and the threads are released together: making one
    costs some 20-30 ms of CPU (its TLS context, even for http://), which inside the timed stretch would delay the
    first requests and take CPU from the service."""
    lock = threading.Lock()
    issued = [0]
    records: list[dict] = []
    stop_at = time.monotonic() + max_seconds
    https = [httpx.Client(timeout=max_seconds) for _ in range(clients)]
    go = threading.Barrier(clients + 1)

    def client(index: int):
        go.wait()
        with https[index] as http:
            while True:
                with lock:
                    if issued[0] >= requests or time.monotonic() > stop_at:
                        return
                    n = issued[0]
                    issued[0] += 1
                t0 = time.perf_counter()
                try:
                    r = http.post(f"{url}/v1/images", json=dict(body, seed=1000 + n))
                    status, replica = r.status_code, r.headers.get("x-sdrt-replica")
                    timings = r.json().get("timings", {}) if status == 200 else {}
                except httpx.HTTPError as e:
                    status, timings, replica = f"transport error: {type(e).__name__}", {}, None
                if status == 429:
                    time.sleep(0.05)  # a polite client backs off a little before it tries again
                with lock:
                    records.append({"status": status, "latency_s": time.perf_counter() - t0, "timings": timings,
                                    "replica": replica,
                                    "images": body.get("num_images", 1) if status == 200 else 0})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    go.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in records if r["status"] == 200]
    lat = sorted(r["latency_s"] for r in ok)
    pct = (lambda q: float(np.percentile(lat, q))) if lat else (lambda q: float("nan"))
    statuses: dict = {}
    for r in records:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return {"clients": clients, "requests": len(records), "wall_s": wall,
            "images_per_s": sum(r["images"] for r in ok) / wall, "latency_p50_s": pct(50), "latency_p99_s": pct(99),
            "queue_ms_mean": statistics.fmean(r["timings"]["queue_ms"] for r in ok) if ok else float("nan"),
            "engine_ms_mean": statistics.fmean(r["timings"]["total_ms"] for r in ok) if ok else float("nan"),
            "statuses": statuses, "errors": len(records) - len(ok),
            "replicas": len({r["replica"] for r in ok if r["replica"]}) or 1}  # no header: one process


def batch_stats(before: dict, after: dict) -> dict:
    calls = after["sdrt_unet_batch_size_count"] - before.get("sdrt_unet_batch_size_count", 0)
    samples = after["sdrt_unet_batch_size_sum"] - before.get("sdrt_unet_batch_size_sum", 0)
    seconds = after["sdrt_step_duration_seconds_sum"] - before.get("sdrt_step_duration_seconds_sum", 0)
    return {"unet_calls": int(calls), "unet_batch_mean": samples / calls if calls else float("nan"),
            "unet_s_per_call": seconds / calls if calls else float("nan")}


def unet_per_sample_s(engine_dir, backend: str, batch: int, height: int, width: int, runs: int = 5) -> float:
    """The UNet alone at ``batch`` samples, on the same backend: seconds per sample (median of ``runs``)."""
    from sdrt.runtime import Pipeline

    pipe = Pipeline(engine_dir, backend=backend)
    m = pipe.model
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((batch, m.latent_channels, height // m.vae_scale_factor,
                                            width // m.vae_scale_factor), dtype=np.float32),
             "timestep": np.full((batch,), 500.0, dtype=np.float32),
             "encoder_hidden_states": rng.standard_normal((batch, m.text_max_length, m.text_hidden_size),
                                                          dtype=np.float32)}
    unet = pipe.sessions["unet"]
    unet.run(feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        unet.run(feeds)
        times.append(time.perf_counter() - t0)
    pipe.close()
    return statistics.median(times) / batch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine_dir")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--size", type=int, default=None, help="height and width (default: the model's)")
    ap.add_argument("--requests", type=int, default=16, help="requests per client count (default 16)")
    ap.add_argument("--clients", default="1,2,4,8", help="client counts; 1 is the sequential baseline")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=600, help="bound of each run")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--overload", action="store_true", help="also: 32 clients against --max-queue 4")
    ap.add_argument("--overhead-size", type=int, default=None, help="also: the service's own time at this size")
    ap.add_argument("--overhead-steps", type=int, default=None, help="steps of that request (default: --steps)")
    ap.add_argument("--ray", default=None, metavar="COUNTS",
                    help="also: the Ray deployment with these replica counts, e.g. 1,2 (needs the ray extra)")
    ap.add_argument("--replica-cpus", type=float, default=None,
                    help="with --ray: CPUs (and CPU threads) per replica (default: cores / replicas)")
    ap.add_argument("--overhead-requests", type=int, default=40,
                    help="with --ray: one-step requests timed for the proxy's added latency (default 40)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from sdrt.runtime.manifest import Manifest

    model = Manifest.load(args.engine_dir).model
    size = args.size or model.default_height
    body = dict(prompt="a red circle on a blue background", steps=args.steps, guidance=args.guidance,
                scheduler=args.scheduler, height=size, width=size)
    report: dict = {"engine_dir": str(args.engine_dir), "settings": dict(body, max_batch=args.max_batch,
                                                                       requests=args.requests), "runs": []}
    service = Service(args.engine_dir, "--max-batch", args.max_batch, "--max-queue", 64, "--backend", args.backend)
    try:
        report["runs"] = load_runs(service, body, args)
        if args.overhead_size:
            report["overhead"] = overhead(service.url, dict(body, steps=args.overhead_steps or args.steps),
                                          args.overhead_size, args.max_seconds)
        if args.ray:
            report["direct_request_overhead"] = request_overhead(service.url, body, args.overhead_requests)
    finally:
        service.stop()
    if args.ray:
        report["ray"] = ray_runs(args, body, report["direct_request_overhead"])

    runs = {r["clients"]: r for r in report["runs"]}
    if 1 in runs:
        for r in report["runs"]:
            r["speedup_vs_sequential"] = r["images_per_s"] / runs[1]["images_per_s"]
    top = report["runs"][-1]
    batch = max(1, round(top["unet_batch_mean"]))
    per_sample = unet_per_sample_s(args.engine_dir, args.backend, batch, size, size)
    samples_per_image = (2 if args.guidance > 1 else 1) * unet_evaluations(args.engine_dir, args.scheduler, args.steps)
    bound = 1.0 / (per_sample * samples_per_image)
    report["unet_bound"] = {"batch": batch, "per_sample_ms": per_sample * 1e3, "samples_per_image": samples_per_image,
                            "images_per_s": bound, "fraction": top["images_per_s"] / bound}
    # the bound: the UNet alone in this process, once the service has stopped (nothing else running), on the same
    # backend with the same session options the service uses
    print(f"UNet bound at batch {batch} (alone, service stopped): {per_sample * 1e3:.2f} ms/sample x "
          f"{samples_per_image} samples/image = "
          f"{bound:.3f} images/s; the service reached {top['images_per_s'] / bound:.0%} of it with "
          f"{top['clients']} clients" + (f", {top['speedup_vs_sequential']:.2f}x sequential" if 1 in runs else ""))

    if args.overload:
        report["overload"] = overload(args, body)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def load_runs(service: Service, body: dict, args, label: str = "") -> list[dict]:
    """The closed loops at each client count (after one more warm request at this size)."""
    runs = []
    closed_loop(service.url, body, 1, 1, args.max_seconds)
    for clients in [int(c) for c in args.clients.split(",")]:
        before, server_cpu, client_cpu = service.metrics(), service.cpu_s(), os.times()
        run = closed_loop(service.url, body, clients, args.requests, args.max_seconds)
        run.update(batch_stats(before, service.metrics()))
        # what shared the cores: the service's CPU time and this load generator's, in cores over the run
        used, now = service.cpu_s(), os.times()
        run["load_generator_cores"] = (now.user + now.system - client_cpu.user - client_cpu.system) / run["wall_s"]
        run["service_cores"] = None if used is None else (used - server_cpu) / run["wall_s"]
        runs.append(run)
        # under Ray, /metrics is the one replica's that answered: its batch figure is that replica's
        print(f"{label}{clients:>2} clients: {run['images_per_s']:.3f} images/s, p50 {run['latency_p50_s']:.2f} s, "
              f"p99 {run['latency_p99_s']:.2f} s, queue {run['queue_ms_mean']:.0f} ms, UNet batch "
              f"{run['unet_batch_mean']:.1f} samples, replicas {run['replicas']}, errors {run['errors']} "
              f"{run['statuses']}; cores used: service {run['service_cores'] or float('nan'):.2f}, "
              f"load generator {run['load_generator_cores']:.2f}", flush=True)
    return runs


def request_overhead(url: str, body: dict, n: int) -> dict:
    """Per request: client latency minus the engine's own time, p50 over ``n`` sequential one-step requests."""
    extra, ready = [], []
    with httpx.Client(timeout=120) as http:
        for i in range(n):
            t0 = time.perf_counter()
            r = http.post(f"{url}/v1/images", json=dict(body, steps=1, seed=i))
            latency = time.perf_counter() - t0
            r.raise_for_status()
            extra.append(latency * 1e3 - r.json()["timings"]["total_ms"])
            t0 = time.perf_counter()
            http.get(f"{url}/readyz").raise_for_status()
            ready.append((time.perf_counter() - t0) * 1e3)
    return {"requests": n, "outside_engine_ms_p50": statistics.median(extra), "readyz_ms_p50": statistics.median(ready)}


def ray_runs(args, body: dict, direct: dict) -> list[dict]:
    """The same loops against `sdrt serve --ray --replicas N`, one fresh local Ray instance per N."""
    from sdrt.runtime.backends.onnxruntime import available_cores

    results = []
    for replicas in [int(c) for c in args.ray.split(",")]:
        cpus = args.replica_cpus or max(1, available_cores() // replicas)
        service = Service(args.engine_dir, "--ray", "--replicas", replicas, "--replica-cpus", cpus,
                          "--max-batch", args.max_batch, "--max-queue", 64, "--backend", args.backend,
                          name="sdrt serve --ray")
        try:
            label = f"ray {replicas} replica{'s' if replicas > 1 else ''} x {cpus:g} CPU: "
            runs = load_runs(service, body, args, label)
            over = request_overhead(service.url, body, args.overhead_requests)
        finally:
            service.stop()
        added = over["outside_engine_ms_p50"] - direct["outside_engine_ms_p50"]
        print(f"{label}per request outside the engine {over['outside_engine_ms_p50']:.1f} ms (direct "
              f"{direct['outside_engine_ms_p50']:.1f} ms): the proxy adds {added:.1f} ms; GET /readyz "
              f"{over['readyz_ms_p50']:.1f} ms (direct {direct['readyz_ms_p50']:.1f} ms)", flush=True)
        results.append({"replicas": replicas, "replica_cpus": cpus, "runs": runs, "request_overhead": over,
                        "proxy_added_ms_p50": added})
    return results


def unet_evaluations(engine_dir, scheduler: str, steps: int) -> int:
    from sdrt.runtime.schedulers import make_scheduler

    config = json.loads((Path(engine_dir) / "scheduler" / "scheduler_config.json").read_text())
    return len(make_scheduler(scheduler, config, steps).timesteps)


def overhead(url: str, body: dict, size: int, max_seconds: float) -> dict:
    """The client's latency minus the engine's own time, at ``size`` px (the median of 3 requests on one
    connection)."""
    samples = []
    with httpx.Client(timeout=max_seconds) as http:
        for seed in range(3):
            t0 = time.perf_counter()
            r = http.post(f"{url}/v1/images", json=dict(body, height=size, width=size, seed=seed))
            latency = time.perf_counter() - t0
            r.raise_for_status()
            samples.append((latency * 1e3 - r.json()["timings"]["total_ms"], latency, r.json()["timings"]))
    service_ms, latency, t = sorted(samples, key=lambda x: x[0])[1]
    result = {"size": size, "latency_ms": latency * 1e3, "engine_ms": t["total_ms"], "service_ms": service_ms,
              "response_ms": t["response_ms"], "fraction": service_ms / (latency * 1e3)}
    print(f"service overhead at {size} px: {service_ms:.1f} ms (PNG+base64 {t['response_ms']:.1f} ms) of "
          f"{latency:.1f} s = {result['fraction']:.3%}", flush=True)
    return result


def overload(args, body: dict) -> dict:
    """32 clients, --max-queue 4: only 200s and 429s, every request answered."""
    service = Service(args.engine_dir, "--max-batch", args.max_batch, "--max-queue", 4, "--backend", args.backend)
    try:
        before = service.metrics()
        run = closed_loop(service.url, dict(body, steps=max(1, args.steps // 2)), 32, 4 * 32, args.max_seconds)
        after = service.metrics()
    finally:
        service.stop()
    answered = sum(run["statuses"].values())
    outcomes = {k.split('"')[1]: after[k] - before.get(k, 0) for k in after if k.startswith("sdrt_requests_total{")}
    only = set(run["statuses"]) <= {"200", "429"}
    print(f"overload (32 clients, --max-queue 4): {run['statuses']}, {answered} answered of {run['requests']} sent; "
          f"server outcomes {outcomes}; only 200/429: {only}", flush=True)
    return {"statuses": run["statuses"], "sent": run["requests"], "answered": answered, "server_outcomes": outcomes,
            "only_200_and_429": only}


if __name__ == "__main__":
    sys.exit(main())
