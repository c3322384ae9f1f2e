"""camserve serve | train-shapes[-detect|-seg] | eval-shapes[-detect|-seg] | explain | evaluate: the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from service.config import Settings
    from service.modelspec import ModelSpec
    from service.registry import LoadedModel

log = logging.getLogger("camserve")


def _fail(message: str) -> int:
    print(f"camserve: {message}", file=sys.stderr)
    return 2


def _settings(config: str | None, **overrides: Any) -> Any:
    """Settings, or ``None`` after printing every problem, one line each."""
    from service.config import ConfigError, load_settings

    try:
        return load_settings(config, **overrides)
    except ConfigError as exc:
        for line in exc.problems:
            _fail(line)
        return None


def _serve(args: argparse.Namespace) -> int:
    from service.api.server import Server
    from service.app import create_app
    from service.logs import setup_logging
    from service.registry import ModelLoadError

    if not args.ray and (args.replicas or args.autoscale or args.num_cpus or args.num_gpus is not None):
        return _fail("--replicas, --autoscale, --num-cpus and --num-gpus need --ray")
    settings = _settings(args.config, host=args.host, port=args.port)
    if settings is None:
        return 2
    setup_logging(settings.log_format, settings.log_level)
    if settings.grpc_port is not None and not args.ray:
        import importlib.util

        if importlib.util.find_spec("grpc") is None or importlib.util.find_spec("grpc_health") is None:
            return _fail("setting `grpc_port` needs grpcio and grpcio-health-checking: pip install 'camserve[grpc]'")
    if args.ray:
        return _serve_ray(args, settings)
    # Models load before the port opens, so a model that cannot load is one line and exit code 2,
    # not a traceback from inside the server after it has announced itself.
    try:
        models = load_models(settings.models)
    except ModelLoadError as exc:
        return _fail(str(exc))
    app = create_app(settings, models)

    server = Server(app, settings)
    log.info("camserve serving %s on http://%s:%d (docs at /docs)", ", ".join(m.name for m in settings.models),
             settings.host, settings.port)
    server.run()
    return 0 if server.started else 1


def load_models(specs: Sequence[ModelSpec]) -> list[LoadedModel]:
    """The models a server is about to serve, loaded in a thread that ends with the load; the calling
    thread (the event loop's, next) then runs torch on one thread. Each model's own thread is thus the
    only one with an OpenMP team, whose idle workers spin (service.threads; the lone-request figures in
    docs/precision.md, from `python -m tests.bench.bench_http --peer-only`)."""
    from service.registry import load_model
    from service.threads import confine

    confine()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="camserve-load") as loader:
        return list(loader.map(load_model, specs))


def _serve_ray(args: argparse.Namespace, settings: Settings) -> int:
    from service.config import ConfigError

    try:
        from service.rayserve import ReplicaOptions, serve_forever
    except ImportError as exc:
        return _fail(f"--ray needs Ray Serve: pip install 'camserve[ray]' ({exc})")
    try:
        bounds: dict[str, Any] = {"replicas": args.replicas}
        if args.autoscale:
            low, _, high = args.autoscale.partition(",")
            bounds = {"min_replicas": low.strip(), "max_replicas": high.strip() or None}
        options = ReplicaOptions.from_args({**bounds, "num_cpus": args.num_cpus, "num_gpus": args.num_gpus})
    except ConfigError as exc:
        return _fail(str(exc))
    return serve_forever(settings, options, timeout_s=args.start_timeout)


def _train_shapes(args: argparse.Namespace) -> int:
    from service.models.shapes import train_shapes

    metrics = train_shapes(Path(args.out), seed=args.seed)
    print(json.dumps(metrics, indent=2))
    return 0


def _eval_shapes(args: argparse.Namespace) -> int:
    from service.models.shapes import evaluate, load_shapes, pointing_game

    model, _ = load_shapes(Path(args.weights) if args.weights else None)
    print(json.dumps({"scenes": args.n, "seed": args.seed, "accuracy": evaluate(model, args.n, args.seed),
                      "pointing_game": pointing_game(model, args.n, args.seed)}))
    return 0


def _train_shapes_detect(args: argparse.Namespace) -> int:
    from service.models.shapes_detect import train_shapes_detect

    print(json.dumps(train_shapes_detect(Path(args.out), seed=args.seed), indent=2))
    return 0


def _train_shapes_seg(args: argparse.Namespace) -> int:
    from service.models.shapes_seg import train_shapes_seg

    print(json.dumps(train_shapes_seg(Path(args.out), seed=args.seed), indent=2))
    return 0


def _eval_shapes_detect(args: argparse.Namespace) -> int:
    from service.models.pointing import detection_pointing
    from service.models.shapes_detect import average_precision_50, load_shapes_detect

    model, _ = load_shapes_detect(Path(args.weights) if args.weights else None)
    figures: dict[str, object] = {"scenes": args.n, "seed": args.seed,
                                  "ap50": average_precision_50(model, args.n, args.seed)}
    for method in ("gradcam", "hirescam"):
        single = detection_pointing(model, args.n, args.seed, method=method)
        pair = detection_pointing(model, args.n, args.seed, n_shapes=2, method=method)
        distinct = detection_pointing(model, args.n, args.seed, n_shapes=2, distinct_labels=True, method=method)
        figures[method] = {"pointing": single.rate, "two_shapes": pair.strict_rate,
                           "two_shapes_distinct_classes": distinct.strict_rate}
    print(json.dumps(figures))
    return 0


def _eval_shapes_seg(args: argparse.Namespace) -> int:
    from service.models.pointing import segmentation_pointing
    from service.models.shapes_seg import load_shapes_seg, mean_iou

    model, _ = load_shapes_seg(Path(args.weights) if args.weights else None)
    figures: dict[str, object] = {"scenes": args.n, "seed": args.seed, "miou": mean_iou(model, args.n, args.seed)}
    for method in ("gradcam", "hirescam"):
        single = segmentation_pointing(model, args.n, args.seed, method=method)
        pair = segmentation_pointing(model, args.n, args.seed, region="mask", n_shapes=2, method=method)
        distinct = segmentation_pointing(model, args.n, args.seed, region="mask", n_shapes=2, distinct_labels=True,
                                         method=method)
        figures[method] = {"pointing": single.rate, "mask_two_shapes": pair.rate,
                           "mask_two_shapes_distinct_classes": distinct.rate}
    print(json.dumps(figures))
    return 0


def _explain(args: argparse.Namespace) -> int:
    """Explain one image file offline, writing one heatmap PNG per target; no server involved."""
    import asyncio
    import re

    from service.app import batch_settings, limits
    from service.dataplane import DataPlane, ExplainOptions
    from service.errors import CamserveError
    from service.registry import ModelLoadError
    from service.repository import ModelRepository

    settings = _settings(args.config)
    if settings is None:
        return 2
    spec = next((m for m in settings.models if m.name == (args.model or m.name)), None)
    if spec is None:
        return _fail(f"unknown model {args.model!r}; configured: {', '.join(m.name for m in settings.models)}")
    try:
        data = Path(args.image).read_bytes()
    except OSError as exc:
        return _fail(f"cannot read {args.image}: {exc.strerror}")
    out = Path(args.out)
    if not out.parent.is_dir():  # before the model loads and the map is computed, not after
        return _fail(f"--out {args.out}: no such folder {str(out.parent)!r}")
    targets = tuple(dict.fromkeys(args.target or ()))  # a target asked twice is explained once

    async def run() -> Any:
        repository = ModelRepository(batch_settings(settings))
        repository.start()
        try:
            await repository.load(spec)
            dataplane = DataPlane(repository, limits(settings))
            return await dataplane.infer(spec.name, [data], explain=ExplainOptions(
                method=args.method, layer=args.layer, targets=targets, output=args.output))
        finally:
            await repository.close()

    try:
        result = asyncio.run(run()).results[0]
    except (CamserveError, ModelLoadError) as exc:
        return _fail(getattr(exc, "message", str(exc)))
    explanations = result.explanations or []
    for e in explanations:
        path = out
        if len(explanations) > 1:  # one file per target, named after it
            safe = re.sub(r"[^\w.-]+", "_", e.label)
            path = out.with_name(f"{out.stem}-{e.index}-{safe}{out.suffix or '.png'}")
        try:
            path.write_bytes(e.heatmap.data)
        except OSError as exc:
            return _fail(f"cannot write {path}: {exc.strerror}")
        print(f"{e.label} ({e.index}) score {e.score:.4f} -> {path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """Faithfulness of each method on one model; the work is in ``service.evaluation``."""
    from service.cam import METHODS
    from service.errors import CamserveError
    from service.evaluation import (
        evaluate,
        evaluate_task,
        folder_samples,
        progress_bar,
        shapes_samples,
        table,
        task_table,
    )
    from service.modelspec import SOURCE_KINDS, ModelSpec
    from service.registry import ModelLoadError, load_model

    settings = _settings(args.config)
    if settings is None:
        return 2
    spec = next((m for m in settings.models if m.name == (args.model or m.name)), None)
    if spec is None and args.model and args.model.partition(":")[0] in SOURCE_KINDS:
        spec = ModelSpec(name=args.model, source=args.model)  # a source, with its defaults
    if spec is None:
        return _fail(f"unknown model {args.model!r}; configured: {', '.join(m.name for m in settings.models)} "
                     "(or give a source, such as builtin:shapes-detect)")
    try:
        model = load_model(spec)
        if model.task is not None:
            if args.images:
                return _fail(f"--images: a {model.task.name} model is scored on shapes scenes, whose boxes and "
                             "masks are known (--shapes N)")
            result = evaluate_task(model, args.shapes, args.seed, args.methods or model.engine.methods,
                                   steps=args.steps, progress=progress_bar)
        else:
            samples = (folder_samples(Path(args.images), model) if args.images
                       else shapes_samples(args.shapes, args.seed))
            reports = evaluate(model, samples, args.methods or list(METHODS), steps=args.steps,
                               progress=progress_bar)
    except (ModelLoadError, CamserveError, ValueError, OSError) as exc:
        return _fail(str(exc))
    if model.task is not None:
        print(f"# {spec.name} ({result.task}): {result.quality_name} {result.quality:.3f}; pointing on "
              f"{args.shapes} scenes of one to three shapes, two shapes on {args.shapes} scenes of two (seed "
              f"{args.seed})")
        print(task_table(result))
        print(f"\nmetrics on the one-to-three-shape scenes, re-scoring each map's own target (a detection's "
              f"score, a segment's mean class probability), deletion/insertion steps {args.steps}")
        return 0
    source = f"{args.images}" if args.images else f"{args.shapes} shapes scenes (seed {args.seed})"
    print(f"# {spec.name}: {len(samples)} images from {source}, metric steps {args.steps}")
    print(table(reports))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="camserve", description="Serve image classifiers over HTTP and explain "
                                     "their decisions with Grad-CAM.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the configured models over HTTP")
    serve.add_argument("--config", help="models.toml (default: the built-in shapes model)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    ray = serve.add_argument_group("Ray Serve", "scale out over replicas (needs the `ray` extra)")
    ray.add_argument("--ray", action="store_true", help="serve through Ray Serve: a local cluster, or RAY_ADDRESS")
    scale = ray.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, help="fixed number of replicas (default 1)")
    scale.add_argument("--autoscale", metavar="MIN,MAX", help="autoscale between MIN and MAX replicas")
    ray.add_argument("--num-cpus", type=float, help="CPUs per replica, fractions allowed (default 1)")
    ray.add_argument("--num-gpus", type=float, help="GPUs per replica (default 1 if a model's device is cuda)")
    ray.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for the replicas")
    serve.set_defaults(func=_serve)
    train = sub.add_parser("train-shapes", help="train the built-in shapes model")
    train.add_argument("--out", default=str(Path(__file__).parent / "models" / "shapes.pt"),
                       help="where to write the weights (default: the shipped file)")
    train.add_argument("--seed", type=int, default=0, help="training seed (default 0, the shipped weights)")
    train.set_defaults(func=_train_shapes)
    ev = sub.add_parser("eval-shapes", help="accuracy and Grad-CAM pointing game of the shapes model")
    ev.add_argument("--n", type=int, default=2000, help="fresh scenes to score (default 2000)")
    ev.add_argument("--seed", type=int, default=1234, help="scene seed (default 1234)")
    ev.add_argument("--weights", help="a shapes.pt other than the shipped one")
    ev.set_defaults(func=_eval_shapes)
    for kind, noun, train_fn, eval_fn in (
        ("detect", "detector", _train_shapes_detect, _eval_shapes_detect),
        ("seg", "segmenter", _train_shapes_seg, _eval_shapes_seg),
    ):
        weights = Path(__file__).parent / "models" / f"shapes_{kind}.pt"
        train_k = sub.add_parser(f"train-shapes-{kind}", help=f"train the built-in shapes-{kind} {noun}")
        train_k.add_argument("--out", default=str(weights), help="where to write the weights (default: shipped file)")
        train_k.add_argument("--seed", type=int, default=0, help="training seed (default 0, the shipped weights)")
        train_k.set_defaults(func=train_fn)
        eval_k = sub.add_parser(f"eval-shapes-{kind}", help=f"quality and Grad-CAM pointing of shapes-{kind}")
        eval_k.add_argument("--n", type=int, default=500, help="fresh multi-shape scenes to score (default 500)")
        eval_k.add_argument("--seed", type=int, default=1234, help="scene seed (default 1234)")
        eval_k.add_argument("--weights", help=f"a shapes_{kind}.pt other than the shipped one")
        eval_k.set_defaults(func=eval_fn)
    ex = sub.add_parser("explain", help="explain one image file without a server")
    ex.add_argument("image", help="an image file (PNG, JPEG, WebP, GIF, BMP, TIFF)")
    ex.add_argument("--config", help="models.toml (default: the built-in shapes model)")
    ex.add_argument("--model", help="which configured model (default: the first)")
    ex.add_argument("--method", help="CAM method (default: gradcam, or eigencam for a model without gradients)")
    ex.add_argument("--layer", help="target layer (default: the model's)")
    ex.add_argument("--target", action="append", help="class index or label (repeatable; default: the top class)")
    ex.add_argument("--output", default="overlay", choices=["png", "overlay"], help="greyscale png or a colour overlay")
    ex.add_argument("--out", default="heatmap.png", help="output file; with several targets, one file per target "
                    "named <stem>-<index>-<label>.png")
    ex.set_defaults(func=_explain)
    ev2 = sub.add_parser("evaluate", help="pointing game, confidence, deletion and insertion of each CAM method; "
                         "quality (AP50, mIoU) and pointing for the built-in detector and segmenter")
    ev2.add_argument("--config", help="models.toml (default: the built-in shapes model)")
    ev2.add_argument("--model", help="which configured model (default: the first), or a source such as "
                     "builtin:shapes-detect")
    source = ev2.add_mutually_exclusive_group()
    source.add_argument("--images", help="a folder of images (explains each one's top class; no pointing game)")
    source.add_argument("--shapes", type=int, default=200, help="fresh shapes scenes, with their boxes (default 200)")
    ev2.add_argument("--seed", type=int, default=4321, help="scene seed (default 4321)")
    ev2.add_argument("--methods", nargs="+", help="methods to compare (default: all)")
    ev2.add_argument("--steps", type=int, default=16, help="deletion/insertion steps (default 16)")
    ev2.set_defaults(func=_evaluate)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code
