"""The embedded sample corpus: a small, deterministic source dataset with known expected outcomes.

Built from real photos that installed packages ship: insightface's group photo (6 different people,
cropped into single-person portraits) and scikit-image's astronaut and cat. Variants exercise every
bad-input and filter path; ``labels.jsonl`` states what each file must become at ingest
(``expect_ingest``: ``ok`` or a reject reason) and after the SPSS filter (``expect_filter``).
``captions.jsonl`` holds the dataset-provided (``original``) captions.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from infu.images import png_bytes
from infu.paths import package_file

GROUP_PHOTO_SHA256 = "47f682e945b659f93a9e490b9c9c4a2a864abe64dace9e1a2893845ddfd69489"
# Face boxes (x1, y1, x2, y2) of the six people in insightface's data/images/t1.jpg (dlib HOG).
GROUP_FACES = [
    (65, 284, 169, 388),
    (275, 179, 362, 266),
    (452, 300, 577, 424),
    (734, 365, 837, 469),
    (883, 89, 987, 192),
    (1114, 284, 1217, 388),
]
ASTRONAUT_HEAD = (96, 0, 352, 300)
CAPTIONS = [
    "a smiling woman with long blond hair holding playing cards, portrait photo",
    "a woman with dark hair looking down, close-up portrait",
    "a smiling man with short dark hair in a dark shirt, portrait",
    "a laughing man in a red shirt holding a poker chip",
    "a man with short dark hair looking to the side, head and shoulders photo",
    "a smiling woman with blond hair, close-up portrait",
]


@dataclass(frozen=True)
class Label:
    path: str
    variant: str
    identity: str | None
    expect_ingest: str
    expect_filter: str
    note: str


def group_photo_path() -> Path:
    path = package_file("insightface", "data", "images", "t1.jpg")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != GROUP_PHOTO_SHA256:
        raise ValueError(f"{path} is not the group photo the corpus crops were measured on (sha256 {digest})")
    return path


def astronaut_path() -> Path:
    return package_file("skimage", "data", "astronaut.png")


def cat_path() -> Path:
    return package_file("skimage", "data", "chelsea.png")


def _jpeg(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **options)
    return buffer.getvalue()


def portraits() -> list[Image.Image]:
    """The six people of the group photo, each cropped around their face and upscaled 2x."""
    group = Image.open(group_photo_path()).convert("RGB")
    width, height = group.size
    crops = []
    for x1, y1, x2, y2 in GROUP_FACES:
        side = max(x2 - x1, y2 - y1)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        box = (
            int(max(0, cx - 0.9 * side)),
            int(max(0, cy - side)),
            int(min(width, cx + 0.9 * side)),
            int(min(height, cy + 1.3 * side)),
        )
        crop = group.crop(box)
        crops.append(crop.resize((crop.width * 2, crop.height * 2), Image.Resampling.LANCZOS))
    return crops


def _watermarked(image: Image.Image) -> Image.Image:
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    font = ImageFont.load_default(size=max(18, image.width // 9))
    for row, y in enumerate(range(0, image.height, image.height // 5)):
        draw.text((-40 * row % 60, y), "© STOCKPHOTO  © STOCKPHOTO", font=font, fill=(255, 255, 255, 150))
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")


def _mirrored(image: Image.Image) -> Image.Image:
    """Same person, different picture: variants of a kept portrait must not be near duplicates of it."""
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _exif_rotated(image: Image.Image) -> bytes:
    """Pixels stored turned 90° counter-clockwise with EXIF orientation 6 (display: rotate 90° clockwise),
    so viewers that apply EXIF show it upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg(image.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_header_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A small file whose PNG header claims ``width x height`` pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def build_sample_corpus(out: Path) -> list[Label]:
    """Write the corpus into ``out`` (images, ``labels.jsonl``, ``captions.jsonl``); returns the labels."""
    out = Path(out)
    people = portraits()
    astronaut = Image.open(astronaut_path()).convert("RGB").crop(ASTRONAUT_HEAD)
    files: dict[str, bytes] = {}
    labels: list[Label] = []
    captions: dict[str, str] = {}

    def add(
        path: str,
        data: bytes,
        variant: str,
        identity: str | None,
        ingest: str,
        filtered: str,
        note: str,
        caption: str | None = None,
    ) -> None:
        files[path] = data
        labels.append(Label(path, variant, identity, ingest, filtered, note))
        if caption:
            captions[path] = caption

    for index, (person, caption) in enumerate(zip(people, CAPTIONS, strict=True)):
        add(
            f"people/person_{index}.jpg",
            _jpeg(person),
            "portrait",
            f"person_{index}",
            "ok",
            "kept",
            "single-person crop of the group photo",
            caption,
        )
    add(
        "people/astronaut.png",
        png_bytes(astronaut),
        "portrait",
        "astronaut",
        "ok",
        "kept",
        "PNG portrait",
        "an astronaut in a white spacesuit in front of the American flag",
    )

    canvas = Image.new("RGB", (1536, 1536), (128, 128, 128))
    canvas.paste(astronaut.resize((128, 150), Image.Resampling.LANCZOS), (704, 693))
    add(
        "variants/tiny_face.jpg",
        _jpeg(canvas),
        "tiny_face",
        "astronaut",
        "ok",
        "face_too_small",
        "a 128 px head in a 1536 px canvas: the face covers about 0.1% of the image",
    )
    pair = Image.new("RGB", (people[0].width + people[1].width, max(people[0].height, people[1].height)))
    pair.paste(people[0], (0, 0))
    pair.paste(people[1], (people[0].width, 0))
    add(
        "variants/two_people.jpg",
        _jpeg(pair),
        "two_people",
        None,
        "ok",
        "multiple_faces",
        "two people side by side",
        "two men side by side",
    )
    add(
        "variants/watermark.jpg",
        _jpeg(_watermarked(people[2])),
        "watermark",
        "person_2",
        "ok",
        "watermark",
        "tiled text watermark over a portrait",
    )
    add(
        "variants/grayscale.jpg",
        _jpeg(_mirrored(people[3]).convert("L")),
        "grayscale",
        "person_3",
        "ok",
        "kept",
        "8-bit grayscale JPEG (mirrored: not a near duplicate of the colour portrait)",
    )
    add(
        "variants/cmyk.jpg",
        _jpeg(_mirrored(people[4]).convert("CMYK")),
        "cmyk",
        "person_4",
        "ok",
        "kept",
        "CMYK JPEG (mirrored)",
    )
    add(
        "variants/exif_rotated.jpg",
        _exif_rotated(_mirrored(people[5])),
        "exif_rotated",
        "person_5",
        "ok",
        "kept",
        "stored sideways, EXIF orientation 6 (mirrored)",
    )
    add(
        "variants/very_small.jpg",
        _jpeg(people[0].resize((40, 50), Image.Resampling.LANCZOS)),
        "very_small",
        "person_0",
        "too_small",
        "too_small",
        "40x50 pixels",
    )
    whole = _jpeg(people[1])
    add(
        "variants/truncated.jpg",
        whole[: len(whole) * 6 // 10],
        "truncated",
        "person_1",
        "bad_image",
        "bad_image",
        "JPEG cut at 60% of its bytes",
    )
    add(
        "variants/not_an_image.jpg",
        b"this is a text file with a .jpg name\n" * 4,
        "not_image",
        None,
        "not_image",
        "not_image",
        "text bytes behind an image extension",
    )
    add(
        "variants/huge_header.png",
        huge_header_png(),
        "huge_header",
        None,
        "too_large",
        "too_large",
        "PNG header claiming 100000x100000 pixels",
    )
    add(
        "variants/cat.png",
        png_bytes(Image.open(cat_path()).convert("RGB")),
        "no_face",
        None,
        "ok",
        "no_face",
        "a cat, no human face",
        "a tabby cat looking up",
    )

    for path, data in files.items():
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (out / "labels.jsonl").write_text("".join(json.dumps(asdict(label)) + "\n" for label in labels))
    (out / "captions.jsonl").write_text(
        "".join(json.dumps({"path": path, "caption": text}) + "\n" for path, text in captions.items())
    )
    return labels


def read_labels(corpus: Path) -> list[Label]:
    return [Label(**json.loads(line)) for line in (Path(corpus) / "labels.jsonl").read_text().splitlines()]


def ensure_sample_corpus(out: Path) -> Path:
    """Build the corpus unless ``out`` already holds it (``labels.jsonl`` is written last)."""
    if not (Path(out) / "labels.jsonl").exists():
        build_sample_corpus(out)
    return Path(out)


def corpus_digest(corpus: Path) -> str:
    """sha256 over every file's path and bytes: equal digests mean identical corpora."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(corpus).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(corpus)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
