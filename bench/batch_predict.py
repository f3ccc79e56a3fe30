"""Benchmark bulk prediction (jobs/predict.py's library call) against a plain single-process loop (issue 14).

    python bench/batch_predict.py [--repeats 394] [--image-size 64] [--batch-size 32] [--actors 2] [--data DIR]

Images/s of ``boneage.scoring.score`` (Ray Data ``map_batches`` over an actor pool: read, decode, frame and predict
in each actor, one torch thread per actor) against a loop in this process over the same files: decode and frame
each with ``load_radiograph``, then ``BoneAgePredictor.predict`` per batch of the same size (torch with its default
threads). Both end to end, from the labels file to the answers; the Ray figure includes starting the actors and
loading the bundle in each. The loop's decode and model times are reported apart, to say where the time goes.

Files: the 32 full-size RSNA radiographs (1600x2080 PNG) beside the project (../shared/data; --data names another
copy), linked ``--repeats`` times under new ids: 394 gives 12,608 files, the size of the RSNA training set (12,611),
a bulk job's size. Fewer files weigh the actors' start-up (about 10 s: each imports torch) more. The bundle: VGG16
of the demo's architecture with seeded random weights at ``--image-size`` (timings do not depend on what the
weights learned). Target: at least 1.5x on 2 cores.
Results: bench/results/batch_predict.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_like_bundle, write_result  # noqa: E402
from prepare_throughput import DATA, repeated_fullsize  # noqa: E402

from boneage.bundle import load_bundle  # noqa: E402
from boneage.config import load_config  # noqa: E402
from boneage.imaging import load_radiograph  # noqa: E402
from boneage.inference import BoneAgePredictor  # noqa: E402
from boneage.rsna import read_labels  # noqa: E402
from boneage.scoring import score  # noqa: E402


def plain_loop(labels: Path, images: Path, bundle: Path, batch_size: int) -> dict[str, float]:
    """The baseline, timed end to end from the labels file; with its decode and model seconds apart."""
    predictor = BoneAgePredictor(load_bundle(bundle))
    start = time.perf_counter()
    table = read_labels(labels, images).table
    decode = model = 0.0
    answers = []
    for first in range(0, len(table), batch_size):
        rows = table.iloc[first:first + batch_size]
        tick = time.perf_counter()
        canvases = np.stack([load_radiograph(Path(p).read_bytes(), predictor.image_size) for p in rows["path"]])
        tock = time.perf_counter()
        answers.append(predictor.predict(canvases, rows["male"].to_numpy()))
        decode, model = decode + tock - tick, model + time.perf_counter() - tock
    seconds = time.perf_counter() - start
    count = len(table)
    return {"images": count, "seconds": seconds, "images_per_s": count / seconds,
            "decode_ms_per_image": 1000 * decode / count, "model_ms_per_image": 1000 * model / count,
            "answers": np.concatenate(answers)}


def ray_data(labels: Path, images: Path, bundle: Path, batch_size: int, actors: int) -> dict[str, float]:
    """``boneage.scoring.score``, timed end to end (actor start-up and bundle loading included)."""
    settings = load_config(overrides=[f"predict.bundle={bundle}", f"predict.labels={labels}",
                                      f"predict.images={images}", f"predict.batch_size={batch_size}",
                                      f"predict.actors={actors}", "predict.use_gpu=false"]).predict
    start = time.perf_counter()
    scored = score(settings, registry_root="unused")
    seconds = time.perf_counter() - start
    count = len(scored.predictions)
    return {"actors": actors, "images": count, "seconds": seconds, "images_per_s": count / seconds,
            "answers": scored.predictions["bone_age_months"].to_numpy()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=394,
                        help="links per full-size radiograph: 394 gives 12,608 files, as many as the RSNA training set")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", type=int, nargs="+", default=[2], help="actor pool sizes to time, in turn")
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding rsna-fullsize/")
    args = parser.parse_args()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as work:
        bundle = demo_like_bundle(Path(work) / "bundle", args.image_size)
        folder = Path(work) / "images"
        folder.mkdir()
        labels, images = repeated_fullsize(folder, args.repeats, args.data)
        baseline = plain_loop(labels, images, bundle, args.batch_size)
        print(f"plain loop: {baseline['images_per_s']:.1f} images/s (decode {baseline['decode_ms_per_image']:.1f} "
              f"ms, model {baseline['model_ms_per_image']:.1f} ms per image)")
        runs = []
        for actors in args.actors:
            run = ray_data(labels, images, bundle, args.batch_size, actors)
            assert np.array_equal(run.pop("answers"), baseline["answers"]), "Ray Data answered differently"
            run["speedup"] = run["images_per_s"] / baseline["images_per_s"]
            print(f"Ray Data, {actors} actor(s): {run['images_per_s']:.1f} images/s, {run['speedup']:.2f}x")
            runs.append(run)
    baseline.pop("answers")
    write_result("batch_predict" if args.image_size == 64 else f"batch_predict_{args.image_size}px", {
        "files": f"rsna-fullsize (32 PNG, 1600x2080) linked {args.repeats}x", "image_size": args.image_size,
        "bundle": "demo architecture (configs/demo.yaml model), seeded random weights", "batch_size":
        args.batch_size, "cpus": ray.cluster_resources().get("CPU"), "plain_loop": baseline, "ray_data": runs,
        "best_speedup": max(r["speedup"] for r in runs), "target_speedup": 1.5,
        "answers_equal": True})
    ray.shutdown()


if __name__ == "__main__":
    main()
