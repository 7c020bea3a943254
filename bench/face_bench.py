"""Face stack throughput: images/s of each backend, and the Ray batch class against a bare loop.

    .venv/bin/python bench/face_bench.py [--rounds 2] [--batch-size 8] [--max-photos 24]

dlib runs on real photos (those shipped by insightface and scikit-image, plus ../shared/data/faces when
present); insightface runs on the tiny ONNX pack of ``infu.face.tiny_models`` (pipeline overhead, not
SCRFD/ArcFace speed). "batch" calls ``FaceBatchAnnotator`` on batches of encoded images, as
``ray.data.map_batches`` would; "loop" calls ``analyzer.analyze`` per image on the same analyzer.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from infu.face import FaceBatchAnnotator, FaceConfig
from infu.face.tiny_models import CELL, white_square_image, write_tiny_pack
from infu.paths import package_file

SHARED_FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"
PACKAGE_IMAGES = package_file("insightface", "data", "images")


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def real_photos(max_photos: int) -> list[bytes]:
    """Encoded photos: the package ones, then ../shared/data/faces when present."""
    paths = sorted(PACKAGE_IMAGES.glob("*.*"))
    if SHARED_FACES.is_dir():
        paths += sorted(path for path in SHARED_FACES.glob("*.*") if path.name != "bulk__pedestrian.png")
    photos = [_png(skimage.data.astronaut())] + [path.read_bytes() for path in paths]
    return photos[:max_photos]


def square_images(count: int) -> list[bytes]:
    """640x640 frames with one white square each, what the tiny detector finds."""
    return [_png(white_square_image(corner=(CELL * (i % 18 + 1), CELL * (i % 7 + 2)))) for i in range(count)]


def best_rate(run: Callable[[], None], count: int, rounds: int) -> float:
    """Images per second of the fastest of ``rounds`` runs."""
    fastest = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        fastest = min(fastest, time.perf_counter() - start)
    return count / fastest


def bench(label: str, config: FaceConfig, images: list[bytes], batch_size: int, rounds: int) -> None:
    annotator = FaceBatchAnnotator(config)
    analyzer = annotator.analyzer
    batches = [
        {"image": np.array(images[start : start + batch_size], dtype=object)}
        for start in range(0, len(images), batch_size)
    ]
    annotator(batches[0])  # warm-up: first inference allocates

    def loop() -> None:
        for image in images:
            analyzer.analyze(image)

    def batched() -> None:
        for batch in batches:
            annotator(batch)

    loop_rate = best_rate(loop, len(images), rounds)
    batch_rate = best_rate(batched, len(images), rounds)
    faces = int(sum(annotator(batch)["face_count"].sum() for batch in batches))
    print(
        f"{label:<34} {len(images):>4} images {faces:>4} faces | loop {loop_rate:8.2f} img/s | "
        f"batch {batch_rate:8.2f} img/s | batch/loop {batch_rate / loop_rate:5.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-photos", type=int, default=24)
    args = parser.parse_args()
    photos = real_photos(args.max_photos)
    bench(
        "dlib (HOG+68+ResNet), real photos", FaceConfig(backend="dlib"), photos, args.batch_size, args.rounds
    )
    with tempfile.TemporaryDirectory() as folder:
        root = write_tiny_pack(Path(folder), "tinypack")
        config = FaceConfig(
            backend="insightface", model_root=root, pack_name="tinypack", recognizer="glintr100"
        )
        bench("insightface, tiny ONNX pack", config, square_images(64), args.batch_size, args.rounds)


if __name__ == "__main__":
    main()
