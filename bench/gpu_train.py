"""GPU training benchmark: VGG16 images/s, model FLOPs utilisation, and how long the GPU waits on Ray Data (issue 3).

    python bench/gpu_train.py                       # on a GPU machine: 224 and 512 px
    python bench/gpu_train.py --device cpu --sizes 64 --steps 3 --batch 4   # a smoke run anywhere

Part 1 needs only PyTorch, torchvision and Kornia (no Ray), so it runs on a bare GPU box: the library's own
`boneage.engine.TrainStep` (bf16 autocast, channels_last, Kornia augmentation on the device, AdamW) on
device-resident uint8 batches, optionally under torch.compile. MFU = (3 x forward FLOPs per image, counted by
torch's FlopCounterMode) x images/s / the GPU's dense bf16 peak. Target: MFU >= 40%.

Part 2 (when Ray is installed): a full epoch fed by Ray Data from a prepared Parquet dataset (`--prepared`),
against the same number of steps on a device-resident batch; the difference is the time the GPU waited on data.
Target: data wait < 5%. Results: bench/results/gpu_train.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from boneage.config import load_config  # noqa: E402
from boneage.engine import TrainStep, synchronize  # noqa: E402
from boneage.model import build_model  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "A100": 312.0,
                    "L4": 121.0, "L40S": 362.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def make_step(cfg, size: int, batch: int, device: torch.device, compile_model: bool) -> TrainStep:
    model = build_model(cfg.model, size).to(device, memory_format=torch.channels_last)
    net = model
    if compile_model:
        model = torch.compile(model)
    return TrainStep(model, net, cfg, steps_per_epoch=1000, target_mean=127.0, target_std=41.0, device=device)


def forward_flops(cfg, size: int, device: torch.device) -> float:
    """FLOPs of one image's forward pass."""
    model = build_model(cfg.model, size).to(device).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, 1, size, size, device=device), torch.ones(1, device=device))
    return float(counter.get_total_flops())


def device_batch(batch: int, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {"image": torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, device=device),
            "boneage": torch.rand(batch, device=device) * 228, "male": torch.randint(0, 2, (batch,), device=device).float()}


def steps_per_second(step: TrainStep, batch: dict, steps: int, warmup: int, device: torch.device) -> float:
    step.start_epoch(0)
    for _ in range(warmup):
        step(batch)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step(batch)
    synchronize(device)  # the only sync: the loop itself never waits on the GPU
    return steps / (time.perf_counter() - started)


def measure_compute(cfg, size: int, batch: int, steps: int, device: torch.device, compile_model: bool,
                    peak: float | None) -> dict:
    step = make_step(cfg, size, batch, device, compile_model)
    rate = steps_per_second(step, device_batch(batch, size, device), steps, warmup=max(3, steps // 5),
                            device=device)
    images_per_s = rate * batch
    train_flops = 3.0 * forward_flops(cfg, size, device)  # forward + backward (2x) per image
    achieved = train_flops * images_per_s / 1e12
    result = {"image_size": size, "batch": batch, "compiled": compile_model, "images_per_s": images_per_s,
              "train_tflop_per_image": train_flops / 1e12, "achieved_tflops": achieved,
              "mfu": achieved / peak if peak else None}
    mfu = f", MFU {100 * result['mfu']:.1f}%" if peak else ""
    print(f"{size} px, batch {batch}{' compiled' if compile_model else ''}: {images_per_s:.1f} img/s, "
          f"{achieved:.2f} TFLOP/s{mfu}")
    return result


def measure_data_wait(cfg, prepared: Path, batch: int, device: torch.device) -> dict:
    """One epoch streamed from Parquet by Ray Data vs the same steps on a resident batch."""
    import ray

    from boneage.dataset import read_split
    from boneage.prepare import read_manifest
    from boneage.train import BoneAgeCollate

    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    size = read_manifest(prepared)["image_size"]
    step = make_step(cfg, size, batch, device, compile_model=False)
    collate = BoneAgeCollate(size)
    dataset = read_split(prepared, "train").materialize()  # read once; the epoch then measures the feed
    iterator = dataset.iter_torch_batches(batch_size=batch, prefetch_batches=4, collate_fn=collate,
                                          drop_last=True, device=str(device), pin_memory=device.type == "cuda")
    step.start_epoch(0)
    synchronize(device)
    started = time.perf_counter()
    steps = 0
    for data in iterator:
        step(data)
        steps += 1
    synchronize(device)
    fed_seconds = time.perf_counter() - started
    compute_seconds = steps / steps_per_second(step, device_batch(batch, size, device), steps, warmup=2,
                                               device=device)
    wait = max(0.0, 1.0 - compute_seconds / fed_seconds)
    print(f"Ray Data epoch: {steps} steps in {fed_seconds:.1f} s vs {compute_seconds:.1f} s on a resident batch: "
          f"the GPU waited {100 * wait:.1f}% of the time")
    return {"steps": steps, "fed_seconds": fed_seconds, "resident_seconds": compute_seconds,
            "data_wait_fraction": wait}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 32], help="per size")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--compile", action="store_true", help="also measure under torch.compile")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak when the GPU is not in the table")
    parser.add_argument("--prepared", type=Path, help="a prepared dataset for the Ray Data epoch (part 2)")
    parser.add_argument("--arch", default="vgg16")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    cfg = load_config(overrides=[f"model.arch={args.arch}", "model.pooling=avg", "model.head=[512, 128]"])
    peak = peak_tflops(device, args.peak_tflops)
    batches = (args.batch * len(args.sizes))[:len(args.sizes)]
    runs = [measure_compute(cfg, size, batch, args.steps, device, False, peak)
            for size, batch in zip(args.sizes, batches)]
    if args.compile:
        runs += [measure_compute(cfg, size, batch, args.steps, device, True, peak)
                 for size, batch in zip(args.sizes, batches)]
    data_wait = measure_data_wait(cfg, args.prepared, batches[0], device) if args.prepared else None
    write_result("gpu_train" if device.type == "cuda" else "gpu_train_cpu_smoke", {
        "device": str(device), "arch": args.arch, "peak_bf16_tflops": peak, "runs": runs, "data_wait": data_wait,
        "targets": {"mfu": 0.4, "data_wait_fraction": 0.05}})


if __name__ == "__main__":
    main()
