"""Where does the model look? The pointing game for every heat-map method of `boneage.inference.EXPLAINERS`.

    python bench/localisation.py [--bundle outputs/registry/boneage-vgg16/1] [--data outputs/prepared/phantoms-32]
                                 [--phantoms outputs/phantoms] [--split test]

On a phantom split (a prepared folder, read without Ray) and the generator's boxes.csv (the age-bearing structures),
each method's heat maps of a trained bundle (default: the demo's, `boneage-vgg16:best` in outputs/registry) are
scored: the share of images whose peak falls inside a box, the share a uniformly random point would get, the mean
heat-map mass inside the boxes, and the time per image, all in one run. The method used until issue 14
(`gradcam-block5`) is the baseline; `chosen` marks DEFAULT_EXPLAINER. Results: bench/results/localisation.json.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from boneage.bundle import load_bundle, resolve  # noqa: E402
from boneage.dataset import load_split, split_path  # noqa: E402
from boneage.inference import DEFAULT_EXPLAINER, EXPLAINERS, BoneAgePredictor  # noqa: E402
from boneage.localisation import canvas_boxes, localisation_scores  # noqa: E402
from boneage.rsna import index_images  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "gradcam-block5"  # the method until issue 14


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="boneage-vgg16:best", help="a bundle folder or registry reference")
    parser.add_argument("--registry", default=str(ROOT / "outputs/registry"))
    parser.add_argument("--data", default=str(ROOT / "outputs/prepared/phantoms-32"), help="prepared phantoms")
    parser.add_argument("--phantoms", default=str(ROOT / "outputs/phantoms"), help="the images and boxes.csv")
    parser.add_argument("--split", default="test")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle_path = resolve(args.bundle, args.registry)
    predictor = BoneAgePredictor(load_bundle(bundle_path))
    split = load_split(args.data, args.split)
    ids = pq.read_table(split_path(args.data, args.split), columns=["id"]).column("id").to_pylist()  # same order
    files = index_images(Path(args.phantoms))
    boxes = canvas_boxes(Path(args.phantoms) / "boxes.csv", {i: files[i][0] for i in ids}, predictor.image_size)
    canvases, male = split["image"][:, 0].numpy(), split["male"].numpy().astype(bool)
    scores = localisation_scores(predictor, canvases, male, [boxes[i] for i in ids], list(EXPLAINERS))
    baseline = next(s for s in scores if s.method == BASELINE)
    for s in scores:
        print(f"{s.method:22s} peak in box {s.peak_in_box:6.1%}  random point {s.random_point:6.1%}  "
              f"mass in boxes {s.mass_in_boxes:6.1%}  {1000 * s.seconds_per_image:6.1f} ms/image"
              f"{'  <- chosen' if s.chosen else ''}")
    write_result("localisation", {
        "bundle": str(bundle_path), "data": args.data, "split": args.split, "images": len(ids),
        "image_size": predictor.image_size, "threads": args.threads, "chosen": DEFAULT_EXPLAINER,
        "baseline": BASELINE, "target_peak_in_box": 0.8,
        "methods": {s.method: {**asdict(s), "peak_in_box_vs_baseline": s.peak_in_box / max(baseline.peak_in_box, 1e-9),
                               "time_vs_baseline": s.seconds_per_image / baseline.seconds_per_image}
                    for s in scores},
    })


if __name__ == "__main__":
    main()
