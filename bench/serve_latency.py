"""Benchmark the service: latency p50/p99 and throughput of /v1/predict and /v1/explain at concurrency 1, 8 and 32,
Ray Serve (batching, configs/serve.yaml's deployment) against a plain single-process FastAPI + uvicorn server
running the same model code (boneage.api.direct_server), in the same run.

    python bench/serve_latency.py [--requests 192] [--warmup-s 30] [--image-size 64]

The model is the demo's architecture (vgg16_bn, 64 px) with random weights: latency does not depend on them. Each
client request uploads one 256 px phantom PNG. Before each measured point, --warmup-s seconds of the same load let
the autoscaler settle and oneDNN pick its kernels: the numbers are steady-state ones. Targets on 2 cores: predict
throughput at concurrency 32 at least 1.5x the plain server's; p99 under 2x p50 at concurrency 8; explain p50 at
most 2.5x predict p50 (concurrency 1). Results: bench/results/serve_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import aiohttp
import numpy as np
import ray
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_like_bundle, write_result  # noqa: E402

from boneage.api import direct_server, serving_in_thread  # noqa: E402
from boneage.config import ServeConfig, load_config, parse_section, to_dict  # noqa: E402
from boneage.phantoms.generate import generate_phantoms  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 8, 32)
ROUTES = ("predict", "explain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=192, help="timed requests per route and concurrency")
    parser.add_argument("--warmup-s", type=float, default=30.0, help="seconds of load before each measured point")
    parser.add_argument("--image-size", type=int, default=64, help="the model's input size")
    args = parser.parse_args()
    serve_file = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    app_config = serve_file["applications"][0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = demo_like_bundle(work / "bundle", args.image_size)
        upload = phantom_png(work)
        settings = parse_section(ServeConfig, {**app_config["args"], "model_uri": str(bundle)}, "serve")
        load_plan = LoadPlan(upload, args.requests, args.warmup_s)
        results = {"plain_uvicorn": measure_plain(settings, load_plan),
                   "ray_serve": measure_serve(settings, app_config["deployments"][0], load_plan)}
    summary = summarise(results)
    for line in summary["lines"]:
        print(line)
    write_result("serve_latency", {"requests_per_point": args.requests, "warmup_s": args.warmup_s,
                                   "image_size": args.image_size, "precision": settings.precision,
                                   "serve_app_args": app_config["args"],
                                   "serve_deployment": app_config["deployments"][0],
                                   "upload_bytes": len(upload), "results": results, **summary["checks"],
                                   "targets": {"predict_throughput_ratio_c32": 1.5, "p99_over_p50_c8": 2.0,
                                               "explain_over_predict_p50": 2.5}})


def phantom_png(work: Path) -> bytes:
    cfg = load_config(overrides=[f"phantoms.out={work / 'phantoms'}", "phantoms.n=1", "phantoms.size=256",
                                 "phantoms.workers=1"])
    generate_phantoms(cfg)
    image = Image.open(next((work / "phantoms").rglob("*.png")))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class LoadPlan:
    """What each measured point sends: ``requests`` uploads of ``upload``, after ``warmup_s`` seconds of the same."""

    upload: bytes
    requests: int
    warmup_s: float


def measure_plain(settings: ServeConfig, plan: LoadPlan) -> dict[str, Any]:
    with serving_in_thread(direct_server(settings, port=8123)) as url:
        return run_load(url, plan)


def measure_serve(settings: ServeConfig, deployment: dict[str, Any], plan: LoadPlan) -> dict[str, Any]:
    from ray import serve

    from boneage.service import service_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8124})
    options = {k: v for k, v in deployment.items() if k != "name"}
    serve.run(service_app(to_dict(settings), options), name="bench", route_prefix="/")
    try:
        return run_load("http://127.0.0.1:8124", plan, replicas=lambda: _running_replicas(serve))
    finally:
        serve.shutdown()
        ray.shutdown()


def run_load(url: str, plan: LoadPlan, replicas: Callable[[], int] | None = None) -> dict[str, Any]:
    """Every route at every concurrency: latencies (ms), throughput (requests/s) and, for Serve, the replicas
    running when the point was measured."""
    out: dict[str, Any] = {}
    for route in ROUTES:
        for concurrency in CONCURRENCY:
            asyncio.run(load(url, route, plan.upload, concurrency, seconds=plan.warmup_s))
            latencies, seconds = asyncio.run(load(url, route, plan.upload, concurrency, count=plan.requests))
            point = {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
                     "throughput_rps": plan.requests / seconds}
            if replicas:
                point["replicas"] = replicas()
            out[f"{route}_c{concurrency}"] = point
            print(f"{url} {route} c={concurrency}: p50 {point['p50_ms']:.0f} ms, p99 {point['p99_ms']:.0f} ms, "
                  f"{point['throughput_rps']:.1f} req/s" + (f", {point['replicas']} replicas" if replicas else ""),
                  flush=True)
    return out


async def load(url: str, route: str, upload: bytes, concurrency: int, count: int | None = None,
               seconds: float | None = None) -> tuple[list[float], float]:
    """``count`` requests, or as many as ``seconds`` allow, from ``concurrency`` clients; each answer must be 200."""
    latencies: list[float] = []
    remaining = iter(range(count)) if count is not None else itertools.count()
    deadline = time.perf_counter() + seconds if seconds is not None else math.inf
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        async def client() -> None:
            for _ in remaining:
                if time.perf_counter() > deadline:
                    return
                form = aiohttp.FormData()
                form.add_field("file", upload, filename="hand.png", content_type="image/png")
                form.add_field("sex", "F")
                started = time.perf_counter()
                async with session.post(f"{url}/v1/{route}", data=form) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{route} answered {response.status}: {await response.text()}")
                latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return latencies, time.perf_counter() - started


def _running_replicas(serve) -> int:
    deployments = serve.status().applications["bench"].deployments
    return sum(d.replica_states.get("RUNNING", 0) for d in deployments.values())


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    serve, plain = results["ray_serve"], results["plain_uvicorn"]
    throughput = serve["predict_c32"]["throughput_rps"] / plain["predict_c32"]["throughput_rps"]
    tail = serve["predict_c8"]["p99_ms"] / serve["predict_c8"]["p50_ms"]
    explain = serve["explain_c1"]["p50_ms"] / serve["predict_c1"]["p50_ms"]
    return {"checks": {"predict_throughput_ratio_c32": throughput, "p99_over_p50_c8": tail,
                       "explain_over_predict_p50": explain},
            "lines": [f"predict throughput at c=32: Serve {serve['predict_c32']['throughput_rps']:.1f} req/s vs plain "
                      f"{plain['predict_c32']['throughput_rps']:.1f}: {throughput:.2f}x (target 1.5x)",
                      f"Serve predict p99/p50 at c=8: {tail:.2f} (target < 2)",
                      f"Serve explain p50 / predict p50 at c=1: {explain:.2f} (target <= 2.5)"]}


if __name__ == "__main__":
    main()
