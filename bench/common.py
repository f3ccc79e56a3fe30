"""Shared by the benchmarks: machine facts and writing results to bench/results/<name>.json."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    """CPU, memory, accelerator and library versions of this machine."""
    info: dict[str, Any] = {
        "hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "logical_cpus": os.cpu_count(), "cpu_model": _cpu_model(), "memory_gib": _memory_gib(),
    }
    for module in ("torch", "torchvision", "ray", "kornia", "pyarrow", "PIL", "numpy"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    return info


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn: Callable[[], Any], runs: int) -> float:
    return statistics.median(timed(fn) for _ in range(runs))


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` with the time and machine; print where."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {"benchmark": name, "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), **payload}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"results: {path}")
    return path


def resident_batches(split: dict, batch_size: int, shuffle: bool = True):
    """Batches of a split held in memory (``boneage.dataset.load_split``), indexed on its own device: shuffled
    full batches for training, or every row in order (``shuffle=False``) for evaluation."""
    import torch

    count, device = len(split["image"]), split["image"].device
    order = torch.randperm(count, device=device) if shuffle else torch.arange(count, device=device)
    stop = count - count % batch_size if shuffle else count
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size]
        yield {name: column[index] for name, column in split.items()}


def demo_like_bundle(folder: Path, image_size: int, seed: int = 0) -> Path:
    """A bundle of the demo's architecture (configs/demo.yaml) with random weights drawn from ``seed``: timings do
    not depend on what the weights learned."""
    import torch

    from boneage.bundle import BundleMeta, DataSource, TargetScale, write_bundle
    from boneage.config import load_config
    from boneage.model import build_model

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").model
    torch.manual_seed(seed)
    model = build_model(cfg, image_size).eval()
    meta = BundleMeta(name="bench", model=cfg, image_size=image_size, target=TargetScale(mean=120.0, std=40.0),
                      data=DataSource(manifest_fingerprint="bench"), metrics={"val_mae": 0.0})
    return write_bundle(folder, model.state_dict(), meta)


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_gib() -> float | None:
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        return round(kib / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None
