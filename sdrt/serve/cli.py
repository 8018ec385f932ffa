"""`sdrt serve`: the step-batching image service over HTTP (torch-free; `pip install 'sdrt[serve]'`)."""

from __future__ import annotations

import logging
import sys

from sdrt.errors import UserError
from sdrt.serve.limits import LIMIT, LIMITS


def _cmd_serve(args) -> int:
    from sdrt.serve.server import ServeConfig, serve

    for limit in LIMITS:
        limit.value(getattr(args, limit.name), limit.flag)
    if not args.drain_timeout > 0:
        raise UserError(f"--drain-timeout {args.drain_timeout}: must be > 0 seconds")
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: must be in 1..65535")
    ray_options = [name for name, given in (("--replicas", args.replicas is not None),
                                            ("--autoscale", args.autoscale is not None),
                                            ("--replica-cpus", args.replica_cpus is not None)) if given]
    if ray_options and not args.ray:
        raise UserError(f"{ray_options[0]}: only with --ray (a deployment on Ray Serve)")
    if args.replicas is not None and args.replicas < 1:
        raise UserError(f"--replicas {args.replicas}: must be >= 1")
    if args.replica_cpus is not None and not args.replica_cpus > 0:
        raise UserError(f"--replica-cpus {args.replica_cpus}: must be > 0")
    from sdrt.runtime.lora import load_loras

    load_loras(args.lora)  # a bad file is refused before the service starts (each replica loads its own)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ServeConfig(engine_dir=args.engine_dir, host=args.host, port=args.port, backend=args.backend,
                         api_key_env=args.api_key_env, drain_timeout=args.drain_timeout, warmup=not args.no_warmup,
                         **{limit.name: getattr(args, limit.name) for limit in LIMITS},
                         embeddings=args.embedding, loras=list(args.lora),
                         precision=args.precision, cache_interval=args.cache_interval, vae=args.vae)
    if args.ray:
        from sdrt.serve.ray_deployment import parse_autoscale, serve_ray

        autoscale = parse_autoscale(args.autoscale) if args.autoscale is not None else None
        return serve_ray(config, replicas=args.replicas or 1, autoscale=autoscale, num_cpus=args.replica_cpus or 1)
    return serve(config)


def add_subcommand(sub) -> None:
    from sdrt.runtime.backends import BACKENDS, DEFAULT_BACKEND
    from sdrt.runtime.cli import add_mode_options
    from sdrt.runtime.settings import add_options

    p = sub.add_parser(
        "serve", help="serve an engine directory over HTTP, batching the UNet steps of concurrent requests",
        description="An image service over ENGINE_DIR: every UNet call batches the running requests that share a "
                    "size, each at its own step with its own scheduler, guidance and seed. Native API "
                    "(POST /v1/images, /v1/jobs with server-sent events), AUTOMATIC1111's /sdapi/v1/txt2img|img2img, "
                    "OpenAI's /v1/images/generations; /healthz, /readyz, /metrics (Prometheus). SIGTERM drains: new "
                    "requests get 503, accepted ones finish, then it exits 0. Needs: pip install 'sdrt[serve]'. "
                    "With --ray: the same service as a Ray Serve deployment, one engine per replica (pip install "
                    "'sdrt[ray]'); on the cluster at $RAY_ADDRESS, else on a local Ray instance bound to loopback.")
    p.add_argument("engine_dir", metavar="ENGINE_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    add_options(p, ("max_batch", "max_queue", "timeout"), table=LIMIT)
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="require 'Authorization: Bearer KEY' with KEY read from this environment variable")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=list(BACKENDS),
                   help="; ".join(f"{k}: {v}" for k, v in BACKENDS.items()))
    p.add_argument("--drain-timeout", type=float, default=60.0, metavar="S",
                   help="on SIGTERM, how long accepted requests may take to finish (default 60)")
    add_options(p, ("max_steps", "max_images", "max_pixels"), table=LIMIT)
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="a textual-inversion embedding (.safetensors) prompts may use as TOKEN; repeatable")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA (.safetensors, kohya or diffusers/peft keys) at load, scale 1 unless given; "
                        "repeatable; no re-export")
    add_mode_options(p)
    p.add_argument("--no-warmup", action="store_true",
                   help="ready without the warm-up step (the first request then pays for it)")
    ray = p.add_argument_group("Ray Serve (--ray)")
    ray.add_argument("--ray", action="store_true",
                     help="deploy on Ray Serve: Ray's proxy listens on --host/--port and spreads requests over the "
                          "replicas; a job's calls go to the replica that owns it; past --max-queue waiting in the "
                          "proxy, 429")
    scale = ray.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=None, metavar="N", help="a fixed number of replicas (default 1)")
    scale.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                       help="autoscale between MIN and MAX replicas on ongoing requests (target: --max-batch each)")
    ray.add_argument("--replica-cpus", type=float, default=None, metavar="F",
                     help="CPUs Ray reserves for each replica, and the threads its CPU backend uses (default 1)")
    p.set_defaults(func=_cmd_serve)
