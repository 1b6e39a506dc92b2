"""Build and launch the afo Ray Serve application.

    python -m deploy.ray.app --model models/SmolLM2-135M-Instruct.Q4_1.gguf --replicas 2

starts (or joins, with `--address`) a Ray cluster, deploys the ingress and the
replicas, and serves until interrupted. `serve run deploy/ray/serve.yaml` deploys the
same application from a config file (`build` is its import path).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any, Dict, Optional

from ray import serve

from .ingress import Ingress
from .replica import DEFAULT_MARGIN_BYTES, DEFAULT_MARGIN_FRACTION, AfoReplica
from .routing import PrefixAffinityRouter

APP_NAME = "afo"
REPLICA_DEPLOYMENT = "AfoReplica"
GIB = 1 << 30


def model_name(model: str) -> str:
    """The id clients use: the file or directory name without `.gguf`."""
    base = os.path.basename(os.path.normpath(model))
    return base[:-5] if base.endswith(".gguf") else base


def build_app(
    model: str,
    *,
    replicas: int = 1,
    ssot_dir: str = "logs/ray",
    memory_bytes: Optional[int] = 2 * GIB,
    num_cpus: float = 1.0,
    resources: Optional[Dict[str, float]] = None,
    max_ongoing_requests: int = 8,
    autoscale_max: Optional[int] = None,
    target_ongoing_requests: float = 4.0,
    prefix_chars: int = 1024,
    imbalance_threshold: int = 4,
    routing: str = "prefix",
    max_attempts: int = 3,
    margin_bytes: int = DEFAULT_MARGIN_BYTES,
    margin_fraction: float = DEFAULT_MARGIN_FRACTION,
    app_name: str = APP_NAME,
):
    """The application: an `Ingress` in front of `replicas` `AfoReplica`s.

    `memory_bytes` None leaves the replica's memory unreserved (its cutline then comes
    from its node's memory). With `autoscale_max`, the replica count scales between
    `replicas` and `autoscale_max` on ongoing requests per replica
    (`target_ongoing_requests`); requests beyond `max_ongoing_requests` on every
    replica wait in the ingress's handle.
    """
    ssot_dir = os.path.abspath(ssot_dir)
    actor_options: Dict[str, Any] = {"num_cpus": num_cpus}
    if memory_bytes:
        actor_options["memory"] = int(memory_bytes)
    if resources:
        actor_options["resources"] = dict(resources)
    options: Dict[str, Any] = {
        "name": REPLICA_DEPLOYMENT,
        "ray_actor_options": actor_options,
        "max_ongoing_requests": max_ongoing_requests,
        "request_router_config": {
            "request_router_class": PrefixAffinityRouter,
            "request_router_kwargs": {"policy": routing, "imbalance_threshold": imbalance_threshold},
        },
        "health_check_period_s": 2,
        "health_check_timeout_s": 10,
        "graceful_shutdown_timeout_s": 5,
    }
    if autoscale_max:
        options["autoscaling_config"] = {
            "min_replicas": replicas,
            "initial_replicas": replicas,
            "max_replicas": autoscale_max,
            "target_ongoing_requests": target_ongoing_requests,
            "upscale_delay_s": 5,
            "downscale_delay_s": 60,
        }
    else:
        options["num_replicas"] = replicas
    replica = serve.deployment(AfoReplica).options(**options).bind(
        os.path.abspath(model), ssot_dir, margin_bytes, margin_fraction
    )
    return Ingress.options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024
    ).bind(replica, os.path.abspath(model), model_name(model), prefix_chars, max_attempts,
           app_name, REPLICA_DEPLOYMENT)


def build(args: Dict[str, Any]):
    """`serve run` / config-file entry point: the `args` are `build_app`'s keywords
    plus `model`."""
    args = dict(args)
    model = args.pop("model")
    if "resources" in args and isinstance(args["resources"], str):
        args["resources"] = _resources(args["resources"])
    return build_app(model, **args)


def _resources(text: str) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for item in filter(None, text.split(",")):
        name, _, amount = item.partition("=")
        out[name.strip()] = float(amount or 1)
    return out


def _bytes(text: str) -> int:
    units = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    t = text.strip().lower()
    num = t.rstrip("kmgib")
    return int(float(num) * units[t[len(num):]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.ray.app", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a GGUF file or a model directory")
    p.add_argument("--replicas", type=int, default=1, help="replicas (the minimum with --autoscale-max)")
    p.add_argument("--autoscale-max", type=int, default=None, help="scale up to this many replicas on queued requests")
    p.add_argument("--target-ongoing", type=float, default=4.0, help="ongoing requests per replica autoscaling aims at")
    p.add_argument("--max-ongoing", type=int, default=8, help="requests a replica runs at once (the rest wait)")
    p.add_argument("--memory", default="2GiB", help="memory Ray reserves per replica ('0': none, use the node's)")
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs per replica (its compute threads)")
    p.add_argument("--resources", default="", help="custom resources per replica, e.g. afo_slot=1")
    p.add_argument("--ssot-dir", default="logs/ray", help="folder of the replicas' SSOT logs")
    p.add_argument("--prefix-chars", type=int, default=1024, help="characters of the conversation hashed to route")
    p.add_argument("--routing", choices=("prefix", "random"), default="prefix")
    p.add_argument("--address", default=None, help="a Ray cluster to join (default: start one here)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    a = p.parse_args(argv)
    if not os.path.exists(a.model):
        p.error(f"--model {a.model}: no such file or directory")

    import ray

    # Workers import this package: put the repository root on their path.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    ray.init(address=a.address, runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
    serve.start(http_options={"host": a.host, "port": a.port}, proxy_location="HeadOnly")
    memory = _bytes(a.memory) or None
    app = build_app(a.model, replicas=a.replicas, ssot_dir=a.ssot_dir, memory_bytes=memory, num_cpus=a.cpus,
                    resources=_resources(a.resources), max_ongoing_requests=a.max_ongoing,
                    autoscale_max=a.autoscale_max, target_ongoing_requests=a.target_ongoing,
                    prefix_chars=a.prefix_chars, routing=a.routing)
    serve.run(app, name=APP_NAME, route_prefix="/")
    print(f"afo on Ray Serve: http://{a.host}:{a.port}/v1 (model {model_name(a.model)}, "
          f"{a.replicas} replica(s), SSOT logs in {os.path.abspath(a.ssot_dir)}); Ctrl-C stops", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
