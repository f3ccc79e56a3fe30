"""GPU training benchmark: VGG16 images/s, model FLOPs utilisation, and how long the GPU waits on Ray Data (issue 3).

    python bench/gpu_train.py                       # on a GPU machine: 224 and 512 px
    python bench/gpu_train.py --device cpu --sizes 64 --steps 3 --batch 4   # a smoke run anywhere
    python bench/gpu_train.py --sizes --train-on PREPARED --set train.epochs=60   # part 3 only: a real training run

Part 1 needs only PyTorch, torchvision and Kornia (no Ray), so it runs on a bare GPU box: the library's own
`boneage.engine.TrainStep` (bf16 autocast, channels_last, Kornia augmentation on the device, AdamW) on
device-resident uint8 batches, optionally under torch.compile. MFU = (3 x forward FLOPs per image, counted by
torch's FlopCounterMode) x images/s / the GPU's dense bf16 peak. Target: MFU >= 40%.

Part 2 (when Ray is installed): a full epoch fed by Ray Data from a prepared Parquet dataset (`--prepared`),
against the same number of steps on a device-resident batch; the difference is the time the GPU waited on data.
Target: data wait < 5%. Results: bench/results/gpu_train.json.

Part 3 (`--train-on`, no Ray): a real training run on a prepared dataset (e.g. the RSNA thumbnails) with the settings
of configs/train.yaml, the splits held on the device and fed to the same `TrainStep`; val MAE every epoch, then the
test MAE of the best epoch's weights. Results: bench/results/gpu_training_run.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import resident_batches, write_result  # noqa: E402

from boneage.config import load_config, to_dict  # noqa: E402
from boneage.dataset import load_split, read_manifest  # noqa: E402
from boneage.engine import TrainStep, evaluate, synchronize  # noqa: E402
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


def split_mae(model, split: dict, batch_size: int, mean: float, std: float, cfg, device: torch.device) -> float:
    """Mean absolute error in months over a resident split (one host sync)."""
    sums = evaluate(model, resident_batches(split, batch_size, shuffle=False), mean, std, device,
                    cfg.train.precision)
    return (sums.abs_error / sums.count).item()


def train_on(cfg, prepared: Path, device: torch.device) -> dict:
    """A real training run without Ray: the library's TrainStep over the prepared splits held on the device."""
    manifest = read_manifest(prepared)
    size, stats = manifest["image_size"], manifest["label_statistics"]["train"]
    mean, std, batch_size = stats["boneage_mean"], stats["boneage_std"], cfg.train.batch_size
    splits = {name: load_split(prepared, name, device) for name in ("train", "val", "test")}
    torch.manual_seed(cfg.train.seed)
    net = build_model(cfg.model, size).to(device, memory_format=torch.channels_last)
    model = torch.compile(net) if cfg.train.compile else net
    step = TrainStep(model, net, cfg, len(splits["train"]["image"]) // batch_size, mean, std, device)
    curve, best_mae, best_weights = [], float("inf"), None
    started = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        step.start_epoch(epoch)
        for batch in resident_batches(splits["train"], batch_size):
            step(batch)
        step.recalibrate_batchnorm()
        curve.append(split_mae(step.eval_model, splits["val"], 2 * batch_size, mean, std, cfg, device))
        if curve[-1] < best_mae:
            best_mae = curve[-1]
            best_weights = {name: tensor.clone() for name, tensor in step.eval_net.state_dict().items()}
        print(f"epoch {epoch + 1}/{cfg.train.epochs}: val MAE {curve[-1]:.2f} months, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    seconds = time.perf_counter() - started
    net.load_state_dict(best_weights)
    test_mae = split_mae(net, splits["test"], 2 * batch_size, mean, std, cfg, device)
    baseline = (splits["val"]["boneage"] - mean).abs().mean().item()
    print(f"best val MAE {best_mae:.2f} (epoch {curve.index(best_mae) + 1}), its test MAE {test_mae:.2f}; "
          f"predict-the-mean val MAE {baseline:.2f}; {seconds:.0f} s")
    return {"prepared": str(prepared), "manifest_fingerprint": manifest["fingerprint"], "image_size": size,
            "splits": manifest["splits"]["counts"], "epochs": cfg.train.epochs, "val_mae_by_epoch": curve,
            "best_val_mae": best_mae, "best_epoch": curve.index(best_mae) + 1, "test_mae_at_best": test_mae,
            "val_mae_mean_baseline": baseline, "train_seconds": seconds,
            "images_per_s": cfg.train.epochs * len(splits["train"]["image"]) / seconds,
            "settings": {area: to_dict(getattr(cfg, area)) for area in ("model", "augment", "train")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="*", default=[224, 512], help="none: skip part 1")
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 64], help="per size")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--compile", action="store_true", help="also measure under torch.compile")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak when the GPU is not in the table")
    parser.add_argument("--prepared", type=Path, help="a prepared dataset for the Ray Data epoch (part 2)")
    parser.add_argument("--arch", default="vgg16")
    parser.add_argument("--train-on", type=Path, help="a prepared dataset for a real training run (part 3)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="part 3: settings over configs/train.yaml, e.g. train.epochs=40")
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
    if args.train_on:
        train_cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "train.yaml", args.set)
        write_result("gpu_training_run" if device.type == "cuda" else "gpu_training_run_cpu_smoke",
                     {"device": str(device), **train_on(train_cfg, args.train_on, device)})
    if not runs:
        return
    data_wait = measure_data_wait(cfg, args.prepared, batches[0], device) if args.prepared else None
    write_result("gpu_train" if device.type == "cuda" else "gpu_train_cpu_smoke", {
        "device": str(device), "arch": args.arch, "peak_bf16_tflops": peak, "runs": runs, "data_wait": data_wait,
        "targets": {"mfu": 0.4, "data_wait_fraction": 0.05}})


if __name__ == "__main__":
    main()
