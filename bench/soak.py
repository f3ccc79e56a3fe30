"""Issue 16: the service under sustained load and under faults, on 127.0.0.1, with configs/serve.yaml's deployment
(autoscaling 1-2 replicas) deployed by `serve deploy`, as a user deploys it. Three phases, one after the other:

1. **soak**: ``--concurrency`` clients for ``--minutes``, mixing predict (60%), explain (20%) and bad requests
   (20%: hostile files and broken forms). Records 5xx answers and transport errors on valid requests (target 0),
   that every bad request got a 4xx, p50/p99 latency of the valid requests per minute (no upward drift), and each
   replica's RSS when first seen after the first minute (warm-up: allocator pools, oneDNN kernels) and at the
   end (target: growth under 5%: no leak from Grad-CAM hooks or buffers).
2. **replica death**: 8 clients for 60 s; 15 s in, one replica is SIGKILLed. Records the failed requests (target:
   only those in flight on it), and the seconds from the kill to the last failure.
3. **rolling update**: 8 clients for 60 s; 15 s in, `serve deploy` of the same file naming a new bundle version.
   Records failed requests (target 0) and when the new version first answered.

    python bench/soak.py [--minutes 5] [--concurrency 32] [--image-size 64]

The model is the demo's architecture with random weights (what is measured does not depend on them). Results:
bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import ray
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_like_bundle, write_result  # noqa: E402
from serve_latency import phantom_png  # noqa: E402

from boneage.bundle import register  # noqa: E402
from boneage.phantoms.hostile import hostile_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PORT, APP = 8131, "soak"
MIX = (("predict", 0.6), ("explain", 0.2), ("bad", 0.2))


@dataclass
class Outcome:
    """One request: when it started (s from the phase's start), how long it took, what it was and got."""

    started: float
    seconds: float
    kind: str
    status: int | None  # None: no HTTP answer (connection refused or reset, timeout)
    version: str | None = None  # the model version that answered, for valid requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        registry = work / "registry"
        for seed in (0, 1):  # two versions, for the rolling update
            register(demo_like_bundle(work / f"bundle-{seed}", args.image_size, seed=seed), registry, "soak")
        requests = Requests(phantom_png(work))
        with served(work, registry) as service:
            results = {"soak": soak(requests, service, args.minutes * 60, args.concurrency),
                       "replica_death": replica_death(requests, service),
                       "rolling_update": rolling_update(requests, service)}
    write_result("soak", {"minutes": args.minutes, "concurrency": args.concurrency, "image_size": args.image_size,
                          **results, "targets": {"valid_failures": 0, "rss_growth_max": 0.05,
                                                 "rolling_update_failures": 0}})


class Requests:
    """What the clients send: a phantom radiograph for the valid requests, hostile files and broken forms for the
    bad ones (each must get a 4xx)."""

    def __init__(self, png: bytes):
        self.png = png
        self.bad = [(case.name, case.data, "F") for case in hostile_files()[:20]] + [("hand.png", png, None),
                                                                                    ("hand.png", png, "female")]

    def form(self, kind: str, rng: random.Random) -> tuple[str, aiohttp.FormData]:
        name, data, sex = rng.choice(self.bad) if kind == "bad" else ("hand.png", self.png, "F")
        form = aiohttp.FormData()
        form.add_field("file", data, filename=name, content_type="application/octet-stream")
        if sex is not None:
            form.add_field("sex", sex)
        return ("explain" if kind == "explain" else "predict"), form


async def client(url: str, requests: Requests, deadline: float, origin: float, outcomes: list[Outcome],
                 seed: int, mix=MIX) -> None:
    """Send requests one after another until ``deadline`` (monotonic seconds)."""
    rng = random.Random(seed)
    kinds, weights = zip(*mix)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            route, form = requests.form(kind, rng)
            started = time.monotonic()
            status, version = None, None
            try:
                async with session.post(f"{url}/v1/{route}", data=form) as response:
                    body = await response.json(content_type=None)
                    status = response.status
                    version = body.get("model", {}).get("version") if status == 200 else None
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                pass  # no usable answer: a transport error
            outcomes.append(Outcome(started - origin, time.monotonic() - started, kind, status, version))


def run_load(requests: Requests, seconds: float, concurrency: int, mix=MIX) -> list[Outcome]:
    """``concurrency`` clients for ``seconds``; every outcome."""
    outcomes: list[Outcome] = []
    origin = time.monotonic()

    async def all_clients() -> None:
        await asyncio.gather(*(client(f"http://127.0.0.1:{PORT}/{APP}", requests, origin + seconds, origin,
                                      outcomes, seed, mix) for seed in range(concurrency)))

    asyncio.run(all_clients())
    return outcomes


def failed(outcome: Outcome) -> bool:
    """A valid request that got no answer or a 5xx."""
    return outcome.kind != "bad" and (outcome.status is None or outcome.status >= 500)


def soak(requests: Requests, service: served, seconds: float, concurrency: int) -> dict[str, Any]:
    """Phase 1: sustained mixed load, replica memory sampled every 10 s."""
    sampler = RssSampler(service.dashboard)
    sampler.start()
    outcomes = run_load(requests, seconds, concurrency)
    sampler.stop()
    valid = [o for o in outcomes if o.kind != "bad"]
    bad = [o for o in outcomes if o.kind == "bad"]
    result = {"requests": len(outcomes), "valid": len(valid), "bad": len(bad),
              "valid_5xx": sum(o.status is not None and o.status >= 500 for o in valid),
              "valid_transport_errors": sum(o.status is None for o in valid),
              "bad_not_4xx": sum(not (o.status and 400 <= o.status < 500) for o in bad),
              "per_minute": per_minute(valid), "replica_rss": sampler.growth(warmup_s=60.0)}
    print(f"soak: {result['valid']} valid requests, {result['valid_5xx']} 5xx, {result['valid_transport_errors']} "
          f"transport errors; {result['bad_not_4xx']} of {result['bad']} bad requests not 4xx", flush=True)
    return result


def per_minute(valid: list[Outcome]) -> list[dict[str, Any]]:
    minutes: dict[int, list[float]] = {}
    for outcome in valid:
        if outcome.status == 200:
            minutes.setdefault(int(outcome.started // 60), []).append(outcome.seconds * 1000)
    return [{"minute": m + 1, "answers": len(ms), "p50_ms": float(np.percentile(ms, 50)),
             "p99_ms": float(np.percentile(ms, 99))} for m, ms in sorted(minutes.items())]


def replica_pids(dashboard: str) -> dict[str, int]:
    """The running replicas of the application: actor name -> process ID (Ray's State API at ``dashboard``)."""
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.name: a.pid for a in actors if (a.class_name or "").startswith("ServeReplica:") and APP in a.name}


def resident_bytes(pid: int) -> int | None:
    """A process's resident memory (Linux's /proc), or None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class RssSampler:
    """Each replica's resident memory, every 10 s, in a thread."""

    def __init__(self, dashboard: str) -> None:
        self.dashboard = dashboard
        self.samples: dict[str, list[tuple[float, int]]] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._origin = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        self._sample()  # the end

    def _run(self) -> None:
        while not self._done.wait(10.0):
            self._sample()

    def _sample(self) -> None:
        for name, pid in replica_pids(self.dashboard).items():
            rss = resident_bytes(pid)
            if rss is not None:
                self.samples.setdefault(name, []).append((time.monotonic() - self._origin, rss))

    def growth(self, warmup_s: float) -> dict[str, dict[str, float]]:
        """Per replica: RSS first seen after the warm-up, at the end, and the growth between them."""
        out = {}
        for name, samples in self.samples.items():
            steady = [rss for t, rss in samples if t >= warmup_s] or [samples[-1][1]]
            out[name] = {"first_mib": samples[0][1] / 2**20, "start_mib": steady[0] / 2**20,
                         "end_mib": samples[-1][1] / 2**20, "growth": samples[-1][1] / steady[0] - 1.0,
                         "samples": len(samples)}
        return out


def replica_death(requests: Requests, service: served) -> dict[str, Any]:
    """Phase 2: SIGKILL one replica 15 s into 60 s of load at concurrency 8 (valid requests only)."""
    killed: dict[str, Any] = {}

    def kill_one() -> None:
        name, pid = sorted(replica_pids(service.dashboard).items())[0]
        killed.update(replica=name, pid=pid, at_s=15.0)
        os.kill(pid, signal.SIGKILL)

    timer = threading.Timer(15.0, kill_one)
    timer.start()
    outcomes = run_load(requests, 60.0, 8, mix=(("predict", 0.8), ("explain", 0.2)))
    failures = [o for o in outcomes if failed(o)]
    in_flight = [o for o in failures if o.started <= 15.0 <= o.started + o.seconds]
    result = {"requests": len(outcomes), "failed": len(failures), "failed_in_flight_at_kill": len(in_flight),
              "seconds_to_recovery": max((o.started + o.seconds for o in failures), default=15.0) - 15.0,
              "killed": killed, "replicas_after": sorted(replica_pids(service.dashboard))}
    print(f"replica death: {result['failed']} of {result['requests']} failed ({result['failed_in_flight_at_kill']} "
          f"in flight at the kill), every request succeeds again {result['seconds_to_recovery']:.1f} s after it",
          flush=True)
    return result


def rolling_update(requests: Requests, service: served) -> dict[str, Any]:
    """Phase 3: `serve deploy` of version 2 15 s into 60 s of load at concurrency 8."""
    deployed: dict[str, Any] = {}

    def update() -> None:
        deployed["returncode"] = service.deploy("soak:2").returncode
        deployed["at_s"] = 15.0

    timer = threading.Timer(15.0, update)
    timer.start()
    outcomes = run_load(requests, 60.0, 8, mix=(("predict", 0.8), ("explain", 0.2)))
    timer.join()
    answered_by_2 = [o.started for o in outcomes if o.version == "2"]
    result = {"requests": len(outcomes), "failed": sum(failed(o) for o in outcomes), **deployed,
              "first_version_2_answer_s": min(answered_by_2, default=None),
              "version_1_answers_after_that": sum(o.version == "1" and o.started > min(answered_by_2, default=1e9)
                                                  for o in outcomes)}
    print(f"rolling update: {result['failed']} of {result['requests']} failed; version 2 answered from "
          f"{result['first_version_2_answer_s']} s", flush=True)
    return result


class served:
    """Ray with a dashboard (Serve's REST API, which `serve deploy` talks to; the State API) and the application
    deployed from configs/serve.yaml with ``model_uri=soak:1``; :meth:`deploy` deploys another version. Shut down
    after."""

    def __init__(self, work: Path, registry: Path):
        self.work, self.registry = work, registry

    def __enter__(self):
        from ray import serve

        context = ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)
        self.dashboard = f"http://{context.dashboard_url}"
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        self.deploy("soak:1")
        while serve.status().applications.get(APP) is None or serve.status().applications[APP].status != "RUNNING":
            time.sleep(1.0)
        return self

    def deploy(self, model_uri: str) -> subprocess.CompletedProcess:
        config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
        config["http_options"]["port"] = PORT
        app = config["applications"][0]
        app.update(name=APP, route_prefix=f"/{APP}")
        app["args"].update(model_uri=model_uri, registry_root=str(self.registry))
        path = self.work / f"serve-{model_uri.replace(':', '-')}.yaml"
        path.write_text(yaml.safe_dump(config))
        return subprocess.run([str(Path(sys.executable).parent / "serve"), "deploy", str(path), "--address",
                               self.dashboard], cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "token"},
                              capture_output=True, text=True, timeout=120)

    def __exit__(self, *exc) -> None:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
