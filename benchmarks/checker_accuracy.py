"""Measure the ShapesEval checker on fresh renders of the shapes world, and the renderer's speed.

For every task (the six GenEval tasks and `novel`) it renders `--n` fresh training-style scenes and
reports how often the checker accepts the true caption and rejects a corrupted one (`corrupt_caption`:
one attribute, count or relation changed), on clean renders and on degraded copies standing in for
blurry generated images: "soft" (Gaussian blur sigma 1 px + pixel noise std 10) and "harsh" (sigma 2 px +
noise std 20, where small diamonds start to read as circles).

    OMP_NUM_THREADS=1 python benchmarks/checker_accuracy.py --n 2000

Output is quoted in reports, not asserted; `tests/test_shapes_eval.py` asserts a smaller sample.
"""

import argparse
import random
import time

import numpy as np
from PIL import Image, ImageFilter

from dalle_hf.data.shapes import EVAL_TASKS, caption_holds, corrupt_caption, sample_example
from dalle_hf.eval.shapes import ShapesEval

# (name, Gaussian blur sigma in px, pixel noise std in [0, 255] per channel)
DEGRADATIONS = (("soft", 1.0, 10.0), ("harsh", 2.0, 20.0))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="fresh renders per task")
    parser.add_argument("--seed", type=int, default=0, help="seeds the scenes, corruptions and noise")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be positive")
    return args


def degrade(image: Image.Image, rng: random.Random, blur_sigma: float, noise_std: float) -> Image.Image:
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(blur_sigma)), dtype=np.float32)
    noisy = blurred + np.random.default_rng(rng.randrange(2**31)).normal(0, noise_std, blurred.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def render_speed(n: int, seed: int) -> float:
    """Images per second of `sample_example` (sampling + rendering), single-threaded, tasks mixed."""
    rng = random.Random(f"speed/{seed}")
    start = time.perf_counter()
    for i in range(n):
        sample_example(rng, EVAL_TASKS[i % len(EVAL_TASKS)])
    return n / (time.perf_counter() - start)


def main(args):
    checker = ShapesEval()
    columns = ["clean"] + [name for name, _, _ in DEGRADATIONS]
    print("| task | n | " + " | ".join(f"{c}: true accepted | {c}: corrupted rejected" for c in columns) + " |")
    print("|---" * (2 + 2 * len(columns)) + "|")
    totals = np.zeros(2 * len(columns))
    detect_seconds, detections = 0.0, 0
    for task in EVAL_TASKS:
        rng = random.Random(f"checker-benchmark/{task}/{args.seed}")
        counts = np.zeros(2 * len(columns))
        for _ in range(args.n):
            image, caption, scene = sample_example(rng, task)
            corrupted = corrupt_caption(scene, rng)
            start = time.perf_counter()
            clean_objects = checker.detect_objects(image)
            detect_seconds += time.perf_counter() - start
            detections += 1
            found = [clean_objects] + [
                checker.detect_objects(degrade(image, rng, sigma, noise)) for _, sigma, noise in DEGRADATIONS
            ]
            counts += [
                outcome
                for objects in found
                for outcome in (caption_holds(caption, objects), not caption_holds(corrupted, objects))
            ]
        totals += counts
        print(f"| {task} | {args.n} | " + " | ".join(f"{c / args.n:.4f}" for c in counts) + " |")
    total = args.n * len(EVAL_TASKS)
    print(f"| all | {total} | " + " | ".join(f"{c / total:.4f}" for c in totals) + " |")
    print(f"\nchecker: {1000 * detect_seconds / detections:.2f} ms per image (detect_objects, clean renders)")
    print(f"renderer: {render_speed(2000, args.seed):.0f} images/s (sample_example, single thread)")


if __name__ == "__main__":
    main(parse_args())
