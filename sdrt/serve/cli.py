"""`sdrt serve`: the step-batching image service over HTTP (torch-free; `pip install 'sdrt[serve]'`)."""

from __future__ import annotations

import logging
import sys

from sdrt.errors import UserError


def _cmd_serve(args) -> int:
    from sdrt.serve.server import ServeConfig, serve

    for name in ("max_batch", "max_queue", "max_steps", "max_images"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    for name in ("timeout", "drain_timeout"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be > 0 seconds")
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: must be in 1..65535")
    if args.max_pixels is not None and args.max_pixels < 1:
        raise UserError(f"--max-pixels {args.max_pixels}: must be >= 1")
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
    config = ServeConfig(engine_dir=args.engine_dir, host=args.host, port=args.port, max_batch=args.max_batch,
                         max_queue=args.max_queue, timeout=args.timeout, backend=args.backend,
                         api_key_env=args.api_key_env, drain_timeout=args.drain_timeout, max_steps=args.max_steps,
                         max_images=args.max_images, max_pixels=args.max_pixels, warmup=not args.no_warmup,
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
    p.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="images in one UNet call, and being denoised at once (default 8; a guided image is two "
                        "UNet samples)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting to start; past it, 429 with Retry-After (default 64)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="deadline of a request in seconds, queue included; past it, 504 (default 600; a request "
                        "may ask for less)")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="require 'Authorization: Bearer KEY' with KEY read from this environment variable")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=list(BACKENDS),
                   help="; ".join(f"{k}: {v}" for k, v in BACKENDS.items()))
    p.add_argument("--drain-timeout", type=float, default=60.0, metavar="S",
                   help="on SIGTERM, how long accepted requests may take to finish (default 60)")
    p.add_argument("--max-steps", type=int, default=150, metavar="N", help="steps per request (default 150)")
    p.add_argument("--max-images", type=int, default=8, metavar="N", help="images per request (default 8)")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="width x height per image (default: 4x the model's default size)")
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
