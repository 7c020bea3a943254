"""A bad-input corpus: hostile and unusual image files, each with its expected ingest outcome.

:func:`build_bad_input_corpus` writes a folder for a ``folder`` source, deterministically (seeded, small
96x64 images), and ``_expected.jsonl`` beside the files: for each file its case name, its path (the
row's ``source_path``), its expected outcome and, when ingest reads a size, the expected width and height
(EXIF orientation applied) and mime type.

The outcomes are those of ``filtering/ingest.py`` and ``infu/images.py`` under ``configs/embedded.yaml``
(``ingest.min_side: 64``, ``ingest.max_pixels`` 64 MP), not wishes: ``ok`` for every colour mode and
container Pillow decodes (palette, alpha, 16-bit, 1-bit, CMYK, animated: the first frame counts), a
reject reason of :class:`infu.records.RejectReason` otherwise, and ``ignored`` for files whose ending is
not an image extension (no row; counted in the manifest's ``inputs.ignored_files``). Where the outcome
would be a product bug, the expectation is the correct behaviour.
"""

from __future__ import annotations

import io
import json
import random
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from infu.images import png_bytes
from infu.records import RejectReason, Status
from infu.sample_corpus import _jpeg, huge_header_png

SEED = 9
WIDTH, HEIGHT = 96, 64
"""Every decodable picture is this size unless its case says otherwise: not square, so an EXIF
orientation that swaps the axes gives a different recorded size, and its shorter side is exactly
``MIN_SIDE`` (kept)."""
MIN_SIDE = 64
"""``ingest.min_side`` of configs/embedded.yaml, which the outcomes assume."""
MAX_PIXELS = 64 * 1024 * 1024
"""``ingest.max_pixels`` (its default), which the outcomes assume."""
LABELS = "_expected.jsonl"
IGNORED = "ignored"
"""The outcome of a file whose ending is not an image extension: no row, counted as ignored."""
OK = Status.OK.value


@dataclass(frozen=True)
class BadInput:
    """One generated file and what ingest must make of it."""

    name: str
    """The case, unique (a test id)."""
    path: str
    """Relative to the corpus folder, ``/``-separated: the row's ``source_path``."""
    expect: str
    """``ok``, a :class:`RejectReason` value, or ``ignored``."""
    width: int | None = None
    height: int | None = None
    """The recorded size (EXIF orientation applied), for every row whose size ingest reads."""
    mime: str | None = None
    note: str = ""

    @property
    def size(self) -> tuple[int, int] | None:
        return None if self.width is None else (self.width, self.height)


def picture(width: int = WIDTH, height: int = HEIGHT, seed: int = SEED) -> Image.Image:
    """A deterministic RGB picture: red grows left to right, green top to bottom, blue is seeded noise
    (no two corners alike, so a wrong orientation would show)."""
    red = np.broadcast_to(np.linspace(0, 255, width, dtype=np.uint8), (height, width))
    green = np.broadcast_to(np.linspace(0, 255, height, dtype=np.uint8)[:, None], (height, width))
    blue = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    return Image.fromarray(np.stack([red, green, blue], axis=-1))


def encode(image: Image.Image, format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def exif(orientation: int) -> bytes:
    block = Image.Exif()
    block[0x0112] = orientation
    return block.tobytes()


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims ``width x height`` pixels."""
    data = bytearray(_jpeg(picture(16, 16)))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)  # marker, length, precision, then Y, X
    return bytes(data)


def broken_exif_jpeg(image: Image.Image) -> bytes:
    """A JPEG with an APP1 ``Exif`` segment of garbage right after its SOI marker."""
    data = _jpeg(image)
    payload = b"Exif\x00\x00" + b"\xde\xad\xbe\xef" * 8
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def _cases(seed: int) -> Iterator[tuple[BadInput, bytes]]:
    rgb = picture(seed=seed)
    jpeg = _jpeg(rgb)
    png = png_bytes(rgb)
    kept = {"width": WIDTH, "height": HEIGHT}
    turned = {"width": HEIGHT, "height": WIDTH}

    def ok(name: str, path: str, data: bytes, mime: str, note: str, size: dict | None = None):
        return BadInput(name, path, OK, mime=mime, note=note, **(size or kept)), data

    # EXIF orientation: the stored pixels are 96x64; 5..8 swap the axes, so the upright image is 64x96.
    for orientation in range(1, 9):
        yield ok(
            f"exif_orientation_{orientation}",
            f"exif/orientation_{orientation}.jpg",
            _jpeg(rgb, exif=exif(orientation)),
            "image/jpeg",
            f"JPEG, EXIF orientation {orientation}",
            turned if orientation >= 5 else kept,
        )
    for fmt, extension, mime in (("PNG", "png", "image/png"), ("WEBP", "webp", "image/webp")):
        yield ok(
            f"exif_orientation_6_{extension}",
            f"exif/orientation_6.{extension}",
            encode(rgb, fmt, exif=exif(6)),
            mime,
            f"{fmt}, EXIF orientation 6",
            turned,
        )
    yield ok(
        "exif_orientation_6_tiff",
        "exif/orientation_6.tiff",
        encode(rgb, "TIFF", exif=exif(6)),
        "image/tiff",
        "TIFF, orientation tag 6: Pillow already reports the upright size at open",
        turned,
    )
    yield ok(
        "exif_orientation_9",
        "exif/orientation_9.jpg",
        _jpeg(rgb, exif=exif(9)),
        "image/jpeg",
        "an orientation out of 1..8 is ignored",
    )
    yield ok(
        "exif_broken",
        "exif/broken.jpg",
        broken_exif_jpeg(rgb),
        "image/jpeg",
        "an undecodable EXIF block never rejects an otherwise valid image",
    )

    # Colour modes and containers: every one is decoded (to RGB, alpha on white), so all are kept.
    palette = rgb.quantize(16)
    modes = [
        ("palette", "modes/palette.png", encode(palette, "PNG"), "image/png", "P"),
        (
            "palette_transparency",
            "modes/palette_transparency.png",
            encode(palette, "PNG", transparency=0),
            "image/png",
            "P with tRNS",
        ),
        (
            "palette_gif_transparency",
            "modes/palette_transparency.gif",
            encode(palette, "GIF", transparency=0),
            "image/gif",
            "GIF, P with a transparent index",
        ),
        ("rgba", "modes/rgba.png", encode(rgb.convert("RGBA"), "PNG"), "image/png", "RGBA"),
        ("rgba_webp", "modes/rgba.webp", encode(rgb.convert("RGBA"), "WEBP"), "image/webp", "RGBA WebP"),
        ("la", "modes/la.png", encode(rgb.convert("LA"), "PNG"), "image/png", "LA"),
        ("gray", "modes/gray.jpg", _jpeg(rgb.convert("L")), "image/jpeg", "8-bit grayscale JPEG"),
        ("gray16_png", "modes/gray16.png", png_bytes(rgb.convert("L").convert("I;16")), "image/png", "I;16"),
        (
            "gray16_tiff",
            "modes/gray16.tiff",
            encode(rgb.convert("L").convert("I;16"), "TIFF"),
            "image/tiff",
            "I;16",
        ),
        ("bilevel_png", "modes/bilevel.png", png_bytes(rgb.convert("1")), "image/png", "1-bit"),
        ("bilevel_bmp", "modes/bilevel.bmp", encode(rgb.convert("1"), "BMP"), "image/bmp", "1-bit BMP"),
        ("cmyk_jpeg", "modes/cmyk.jpg", _jpeg(rgb.convert("CMYK")), "image/jpeg", "CMYK JPEG"),
        ("cmyk_tiff", "modes/cmyk.tiff", encode(rgb.convert("CMYK"), "TIFF"), "image/tiff", "CMYK TIFF"),
        ("progressive", "modes/progressive.jpg", _jpeg(rgb, progressive=True), "image/jpeg", "progressive"),
        ("bmp", "modes/rgb.bmp", encode(rgb, "BMP"), "image/bmp", "RGB BMP"),
        (
            "trailing_bytes",
            "modes/trailing.jpg",
            jpeg + b"junk after EOI" * 8,
            "image/jpeg",
            "junk after EOI",
        ),
    ]
    for name, path, data, mime, note in modes:
        yield ok(name, path, data, mime, note)

    frames = [picture(seed=seed + index) for index in range(3)]
    animation = {"save_all": True, "append_images": frames[1:], "duration": 80, "loop": 0}
    for name, path, fmt, mime in (
        ("animated_gif", "animated/anim.gif", "GIF", "image/gif"),
        ("animated_webp", "animated/anim.webp", "WEBP", "image/webp"),
        ("animated_png", "animated/anim.png", "PNG", "image/png"),
    ):
        yield ok(name, path, encode(frames[0], fmt, **animation), mime, "3 frames; the first is probed")

    # Rejected: bombs, empty, truncated or corrupt, not images, too small.
    too_large, bad_image, not_image = RejectReason.TOO_LARGE, RejectReason.BAD_IMAGE, RejectReason.NOT_IMAGE
    rejects = [
        ("bomb_png", "bad/bomb.png", huge_header_png(), too_large, "PNG header claiming 100000x100000"),
        (
            "bomb_png_over_max_pixels",
            "bad/bomb_10k.png",
            huge_header_png(10_000, 10_000),
            too_large,
            "10000x10000: under Pillow's own bomb limit, over ingest.max_pixels",
        ),
        ("bomb_jpeg", "bad/bomb.jpg", jpeg_claiming(65_000, 65_000), too_large, "SOF0 claiming 65000x65000"),
        ("zero_bytes_jpg", "bad/empty.jpg", b"", bad_image, "zero-byte file"),
        ("zero_bytes_png", "bad/empty.png", b"", bad_image, "zero-byte file"),
        ("truncated_jpeg", "bad/truncated.jpg", jpeg[: len(jpeg) * 6 // 10], bad_image, "cut at 60%"),
        ("truncated_png", "bad/truncated.png", png[: len(png) // 2], bad_image, "cut at 50%"),
        ("text_as_jpg", "bad/text.jpg", b"this is a text file, not a JPEG\n" * 4, not_image, "text"),
        ("random_as_png", "bad/random.png", random.Random(seed).randbytes(4096), not_image, "random bytes"),
        ("html_as_webp", "bad/page.webp", b"<!doctype html><title>x</title>\n", not_image, "HTML"),
    ]
    for name, path, data, reason, note in rejects:
        yield BadInput(name, path, reason.value, note=note), data
    too_small = RejectReason.TOO_SMALL.value
    for name, path, (width, height) in (
        ("too_small", "bad/too_small.png", (40, 30)),
        ("too_small_one_pixel", "bad/one_pixel.png", (1, 1)),
        ("too_small_by_one", "bad/too_small_by_one.png", (WIDTH, MIN_SIDE - 1)),
    ):
        yield (
            BadInput(name, path, too_small, width, height, "image/png", f"{width}x{height}"),
            png_bytes(picture(width, height, seed)),
        )

    # Unusual names, each a valid 96x64 JPEG unless said otherwise.
    long_name = "long-" + "n" * (200 - len("long-.jpg")) + ".jpg"
    names = [
        ("name_spaces", "names/with  spaces .jpg"),
        ("name_unicode", "names/ünïcødé 日本語 🙂.jpg"),
        ("name_leading_dash", "names/-rf.jpg"),
        ("name_200_bytes", f"names/{long_name}"),
        ("name_newline", "names/new\nline.jpg"),
        ("name_tab_quotes", 'names/tab\tit\'s "$HOME" `x`.jpg'),
        ("name_backslash", "names/back\\slash.jpg"),
        ("name_hidden", "names/.hidden.jpg"),
        ("name_extension_only", "names/.jpg"),
        ("name_uppercase_extension", "names/UPPER.JPG"),
        ("name_mixed_case_extension", "names/Mixed.JpEg"),
        ("name_unusual_folders", "names/sub dir/ünï -x/nested.jpg"),
    ]
    for name, path in names:
        yield ok(name, path, jpeg, "image/jpeg", "unusual name")
    yield ok("name_double_extension", "names/photo.png.jpg", png, "image/png", "PNG bytes, .png.jpg")
    yield ok("jpeg_named_png", "names/jpeg.png", jpeg, "image/jpeg", "the content decides the mime")
    for name, path in (
        ("name_not_image_extension", "names/photo.jpg.txt"),
        ("name_no_extension", "names/photo"),
        ("name_trailing_dot", "names/photo.jpg."),
    ):
        yield BadInput(name, path, IGNORED, note="not an image extension: counted as ignored"), jpeg


def bad_inputs(seed: int = SEED) -> list[tuple[BadInput, bytes]]:
    """Every case with its file's bytes, in memory."""
    cases = list(_cases(seed))
    names = [case.name for case, _ in cases]
    paths = [case.path for case, _ in cases]
    assert len(set(names)) == len(names) and len(set(paths)) == len(paths), "case names and paths are unique"
    return cases


def build_bad_input_corpus(out: Path, seed: int = SEED) -> list[BadInput]:
    """Write every case into ``out`` and ``_expected.jsonl``; returns the cases written. A name the file
    system refuses (a newline, say) is left out."""
    out = Path(out)
    written = []
    for case, data in bad_inputs(seed):
        target = out / case.path
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        except OSError:
            continue
        written.append(case)
    (out / LABELS).write_text("".join(json.dumps(asdict(case)) + "\n" for case in written))
    return written


def read_expectations(corpus: Path) -> list[BadInput]:
    return [BadInput(**json.loads(line)) for line in (Path(corpus) / LABELS).read_text().splitlines()]


def expected_ignored_files(cases: list[BadInput]) -> dict[str, int]:
    """``inputs.ignored_files`` of an ingest of the corpus: the ignored cases and ``_expected.jsonl``, by
    ending (``<none>`` for a name without one)."""
    endings = Counter(_ending(case.path.rsplit("/", 1)[-1]) for case in cases if case.expect == IGNORED)
    endings[_ending(LABELS)] += 1
    return dict(endings)


def _ending(name: str) -> str:
    return (name.rsplit(".", 1)[-1].lower() if "." in name else "") or "<none>"
