"""Quality heads throughput on CPU: ms per image of each stage of the tiny ``QualityScorer``.

    .venv/bin/python bench/quality_bench.py [--rounds 3] [--batch-size 16] [--images 32]

Images are the sample corpus portraits (half of them with the tiled watermark), cycled to ``--images``.
Stages: CLIP embedding, the aesthetic + NSFW heads on the embeddings, the text-overlay detector and
the LAION classifier's architecture on timm's tiny EfficientNet (pipeline cost, not B3 speed).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from PIL import Image

from infu.quality import LaionWatermarkClassifier, QualityConfig, QualityScorer, TextOverlayDetector
from infu.sample_corpus import _watermarked, portraits


def corpus_images(count: int) -> list[Image.Image]:
    people = portraits()
    pool = people + [_watermarked(person) for person in people]
    return [pool[index % len(pool)] for index in range(count)]


def best_ms_per_image(run: Callable[[], object], count: int, rounds: int) -> float:
    timings = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
    return 1000 * min(timings) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=32)
    args = parser.parse_args()

    images = corpus_images(args.images)
    scorer = QualityScorer(QualityConfig(batch_size=args.batch_size))
    embeddings = scorer.embedder.embed(images)
    laion = LaionWatermarkClassifier.tiny(batch_size=args.batch_size)
    stages: dict[str, Callable[[], object]] = {
        "clip_embed (tiny)": lambda: scorer.embedder.embed(images),
        "aesthetic+nsfw heads": lambda: (scorer.aesthetic.score(embeddings), scorer.nsfw.score(embeddings)),
        "text_overlay": lambda: TextOverlayDetector().score(images),
        "laion classifier (tiny backbone)": lambda: laion.score(images),
        "QualityScorer.score (tiny)": lambda: scorer.score(images),
    }
    print(f"{len(images)} images, batch size {args.batch_size}, best of {args.rounds} rounds")
    for name, run in stages.items():
        print(f"{name:34s} {best_ms_per_image(run, len(images), args.rounds):8.2f} ms/image")


if __name__ == "__main__":
    main()
