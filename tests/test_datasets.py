"""Dataset adapters on small synthetic trees in each dataset's distributed layout; identities and
attributes through ingest and filter on real photos."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from filtering.config import SourceConfig
from filtering.datasets import DATASET_SOURCES, VIDEO_NOTE, DatasetSource
from filtering.filter import run_filter
from filtering.ingest import run_ingest
from filtering.sources import Source, SourceError, open_source
from infu.config import load_config
from infu.shards import iter_samples, read_records

from .conftest import EMBEDDED

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair "
    "Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face "
    "Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair "
    "Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()


def write_image(root: Path, relative: str, shade: int = 0) -> None:
    """A tiny real image, its format taken from the file ending."""
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    file_format = {"jpg": "JPEG", "png": "PNG"}[relative.rsplit(".", 1)[-1]]
    Image.new("RGB", (8, 6), (shade, 100, 200)).save(buffer, format=file_format)
    path.write_bytes(buffer.getvalue())


def write_text(root: Path, relative: str, text: str | bytes) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)


def open_dataset(kind: str, root: Path) -> DatasetSource:
    source = open_source(SourceConfig(kind=kind, path=root, dataset=kind))
    assert isinstance(source, DatasetSource)
    assert type(source) is DATASET_SOURCES[kind]
    return source


def check_items(source: Source, expected: list[dict[str, Any]]) -> None:
    """Exact items in order, JSON-serialisable, and each read back as the file's bytes."""
    items = list(source.iter_items())
    assert items == expected
    assert json.loads(json.dumps(items)) == items
    for item in items:
        assert source.read(item) == (source.root / item["source_path"]).read_bytes()


def test_registry_names_every_dataset():
    assert set(DATASET_SOURCES) == {
        "vggface2",
        "millioncelebs",
        "celeba",
        "celebv_hq",
        "celebv_text",
        "vfhq",
        "ffhq",
        "easyportrait",
        "cosmicman_hq",
    }
    assert all(issubclass(source, Source) for source in DATASET_SOURCES.values())


def test_missing_dataset_root_is_an_error(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_dataset("vggface2", tmp_path / "absent")


def test_vggface2_identity_is_the_class_folder(tmp_path):
    for shade, relative in enumerate(
        ["train/n000002/0001_01.jpg", "train/n000002/0002_01.jpg", "train/n000010/0001_01.jpg"]
    ):
        write_image(tmp_path, relative, shade)
    write_image(tmp_path, "test/n000001/0001_01.jpg")
    write_text(
        tmp_path, "identity_meta.csv", 'Class_ID, Name, Sample_Num, Flag, Gender\nn000001, "A_B", 1, 0, m\n'
    )
    write_text(tmp_path, "train/n000002/Thumbs.db", "x")
    source = open_dataset("vggface2", tmp_path)
    check_items(
        source,
        [
            {"source_path": "test/n000001/0001_01.jpg", "caption": None, "identity": "n000001"},
            {"source_path": "train/n000002/0001_01.jpg", "caption": None, "identity": "n000002"},
            {"source_path": "train/n000002/0002_01.jpg", "caption": None, "identity": "n000002"},
            {"source_path": "train/n000010/0001_01.jpg", "caption": None, "identity": "n000010"},
        ],
    )
    assert source.describe()["ignored_files"] == {"csv": 1, "db": 1}
    assert "not_walked" not in source.describe()


def test_millioncelebs_identity_is_the_first_folder(tmp_path):
    write_image(tmp_path, "m.01_0d4/1.jpg")
    write_image(tmp_path, "m.01_0d4/2.jpg", 1)
    write_image(tmp_path, "m.0zz/faces/1.png", 2)
    write_image(tmp_path, "loose.jpg", 3)
    write_text(tmp_path, "README", "about")
    source = open_dataset("millioncelebs", tmp_path)
    check_items(
        source,
        [
            {"source_path": "loose.jpg", "caption": None, "identity": None},
            {"source_path": "m.01_0d4/1.jpg", "caption": None, "identity": "m.01_0d4"},
            {"source_path": "m.01_0d4/2.jpg", "caption": None, "identity": "m.01_0d4"},
            {"source_path": "m.0zz/faces/1.png", "caption": None, "identity": "m.0zz"},
        ],
    )
    assert source.ignored == {"<none>": 1}


def celeba_attributes(positive: set[str]) -> dict[str, str]:
    """Every CelebA attribute of one image by name: ``"true"`` for the positive ones, else ``"false"``."""
    return {name: "true" if name in positive else "false" for name in CELEBA_ATTRIBUTES}


def celeba_attribute_line(name: str, positive: set[str]) -> str:
    values = " ".join(f"{1 if attribute in positive else -1:>2}" for attribute in CELEBA_ATTRIBUTES)
    return f"{name} {values}\n"


@pytest.fixture
def celeba(tmp_path) -> Path:
    for shade, name in enumerate(["000001.jpg", "000002.jpg", "000003.jpg"]):
        write_image(tmp_path, f"img_align_celeba/{name}", shade)
    write_text(tmp_path, "img_align_celeba/notes.txt", "stray")
    write_text(
        tmp_path,
        "Anno/list_attr_celeba.txt",
        "2\n"
        + " ".join(CELEBA_ATTRIBUTES)
        + " \n"
        + celeba_attribute_line("000001.jpg", {"Arched_Eyebrows", "Smiling", "Young"})
        + celeba_attribute_line("000002.jpg", set()),
    )
    write_text(tmp_path, "Anno/identity_CelebA.txt", "000001.jpg 2880\n000002.jpg 2937\n")
    write_text(tmp_path, "Eval/list_eval_partition.txt", "000001.jpg 0\n")
    return tmp_path


def test_celeba_attributes_and_identities_come_from_the_annotations(celeba):
    source = open_dataset("celeba", celeba)
    first = celeba_attributes({"Arched_Eyebrows", "Smiling", "Young"})
    assert len(first) == 40 and [name for name, value in first.items() if value == "true"] == [
        "Arched_Eyebrows",
        "Smiling",
        "Young",
    ]
    check_items(
        source,
        [
            {
                "source_path": "img_align_celeba/000001.jpg",
                "caption": None,
                "identity": "2880",
                "attributes": first,
            },
            {
                "source_path": "img_align_celeba/000002.jpg",
                "caption": None,
                "identity": "2937",
                "attributes": celeba_attributes(set()),
            },
            {
                "source_path": "img_align_celeba/000003.jpg",
                "caption": None,
                "identity": None,
                "attributes": None,
            },
        ],
    )
    description = source.describe()
    assert description["ignored_files"] == {"txt": 1}
    assert description["image_folder"] == "img_align_celeba"
    assert description["annotations"] == ["Anno/list_attr_celeba.txt", "Anno/identity_CelebA.txt"]
    assert description["not_walked"] == ["Eval"]


def test_celeba_prefers_the_in_the_wild_images(celeba):
    write_image(celeba, "Img/img_celeba/000001.jpg")
    source = open_dataset("celeba", celeba)
    assert [item["source_path"] for item in source.iter_items()] == ["Img/img_celeba/000001.jpg"]
    assert source.describe()["not_walked"] == ["Eval", "img_align_celeba"]


def test_celeba_malformed_annotations_name_file_and_line(celeba):
    attributes = celeba / "Anno/list_attr_celeba.txt"
    good = attributes.read_text()
    attributes.write_text(good.replace("000002.jpg -1", "000002.jpg  0"))
    with pytest.raises(SourceError, match=r"list_attr_celeba.txt:4: expected a file name and 40 values"):
        list(open_dataset("celeba", celeba).iter_items())
    attributes.write_text("3" + good[1:])
    with pytest.raises(SourceError, match=r"list_attr_celeba.txt:1: declares 3 images but lists 2"):
        list(open_dataset("celeba", celeba).iter_items())
    attributes.write_text(good)
    (celeba / "Anno/identity_CelebA.txt").write_text("000001.jpg 2880\n000002.jpg x\n")
    with pytest.raises(SourceError, match=r"identity_CelebA.txt:2: expected the identity number, got 'x'"):
        list(open_dataset("celeba", celeba).iter_items())


def test_ffhq_reads_only_the_1024_images(tmp_path):
    for shade, relative in enumerate(["00000/00000.png", "00000/00001.png", "01000/01000.png"]):
        write_image(tmp_path, f"images1024x1024/{relative}", shade)
    write_text(tmp_path, "images1024x1024/LICENSE.txt", "license")
    write_image(tmp_path, "thumbnails128x128/00000/00000.png")
    write_text(tmp_path, "ffhq-dataset-v2.json", "{}")
    source = open_dataset("ffhq", tmp_path)
    check_items(
        source,
        [
            {"source_path": "images1024x1024/00000/00000.png", "caption": None},
            {"source_path": "images1024x1024/00000/00001.png", "caption": None},
            {"source_path": "images1024x1024/01000/01000.png", "caption": None},
        ],
    )
    assert source.describe()["ignored_files"] == {"txt": 1}
    assert source.describe()["not_walked"] == ["ffhq-dataset-v2.json", "thumbnails128x128"]
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(SourceError, match="images1024x1024 does not exist"):
        list(open_dataset("ffhq", tmp_path / "elsewhere").iter_items())


@pytest.fixture
def easyportrait(tmp_path) -> Path:
    for shade, relative in enumerate(["train/a1.jpg", "train/b2.jpg", "val/c3.jpg", "test/d4.jpg"]):
        write_image(tmp_path, f"images/{relative}", shade)
    write_text(tmp_path, "images/train/desktop.ini", "x")
    write_image(tmp_path, "annotations/train/a1.png")
    write_text(
        tmp_path,
        "annotations/meta.csv",
        ",attachment_id,user_id,data_hash,width,height,brightness,train,test,valid\n"
        "0,a1,u1,e8f,8,6,136,True,False,False\n"
        "1,b2,u1,df5,8,6,148,True,False,False\n"
        "2,c3,u2,a69,8,6,140,False,False,True\n",
    )
    return tmp_path


def test_easyportrait_reads_images_with_user_identities(easyportrait):
    source = open_dataset("easyportrait", easyportrait)
    check_items(
        source,
        [
            {"source_path": "images/test/d4.jpg", "caption": None, "identity": None},
            {"source_path": "images/train/a1.jpg", "caption": None, "identity": "u1"},
            {"source_path": "images/train/b2.jpg", "caption": None, "identity": "u1"},
            {"source_path": "images/val/c3.jpg", "caption": None, "identity": "u2"},
        ],
    )
    assert source.describe()["ignored_files"] == {"ini": 1}
    assert source.describe()["not_walked"] == []


def test_easyportrait_malformed_meta_names_file_and_line(easyportrait):
    meta = easyportrait / "annotations/meta.csv"
    meta.write_text(meta.read_text().replace("1,b2,u1,", "1,b2,,"))
    with pytest.raises(SourceError, match=r"meta.csv:3: expected an attachment_id and a user_id"):
        list(open_dataset("easyportrait", easyportrait).iter_items())
    meta.write_text("id,user\n")
    with pytest.raises(SourceError, match=r"meta.csv:1: the header lacks the columns"):
        list(open_dataset("easyportrait", easyportrait).iter_items())


CELEBV_HQ_INFO = {
    "meta_info": {"appearance_mapping": ["Blurry", "Male", "Young"], "action_mapping": ["blow", "talk"]},
    "clips": {
        "M2Ohb0FAaJU_1": {
            "ytb_id": "M2Ohb0FAaJU",
            "duration": {"start_sec": 81.62, "end_sec": 86.17},
            "bbox": {"top": 0.0, "bottom": 0.8815, "left": 0.1964, "right": 0.6922},
            "attributes": {
                "appearance": [0, 1, 1],
                "action": [0, 1],
                "emotion": {"sep_flag": False, "labels": "neutral"},
            },
            "version": "v0.1",
        },
        "_0tf2n3rlJU_0": {
            "ytb_id": "_0tf2n3rlJU",
            "attributes": {
                "appearance": [0, 0, 1],
                "action": [0, 0],
                "emotion": {
                    "sep_flag": True,
                    "labels": [
                        {"emotion": "neutral", "start_sec": 0, "end_sec": 0.28},
                        {"emotion": "happy", "start_sec": 1.28, "end_sec": 3.28},
                        {"emotion": "neutral", "start_sec": 3.28, "end_sec": 4.0},
                    ],
                },
            },
        },
    },
}


@pytest.fixture
def celebv_hq(tmp_path) -> Path:
    write_text(tmp_path, "celebvhq_info.json", json.dumps(CELEBV_HQ_INFO, indent=1))
    write_image(tmp_path, "frames/M2Ohb0FAaJU_1/000000.png")
    write_image(tmp_path, "frames/M2Ohb0FAaJU_1/000001.png", 1)
    write_image(tmp_path, "frames/_0tf2n3rlJU_0/000000.jpg", 2)
    write_image(tmp_path, "frames/unlisted_0/000000.png", 3)
    write_text(tmp_path, "raw/M2Ohb0FAaJU_1.mp4", "not decoded")
    return tmp_path


def test_celebv_hq_frames_with_clip_attributes(celebv_hq):
    source = open_dataset("celebv_hq", celebv_hq)
    first_clip = {
        "caption": None,
        "identity": "M2Ohb0FAaJU_1",
        "attributes": {"Male": "true", "Young": "true", "talk": "true", "emotion": "neutral"},
    }
    check_items(
        source,
        [
            {"source_path": "frames/M2Ohb0FAaJU_1/000000.png", **first_clip},
            {"source_path": "frames/M2Ohb0FAaJU_1/000001.png", **first_clip},
            {
                "source_path": "frames/_0tf2n3rlJU_0/000000.jpg",
                "caption": None,
                "identity": "_0tf2n3rlJU_0",
                "attributes": {"Young": "true", "emotion": "neutral, happy"},
            },
            {
                "source_path": "frames/unlisted_0/000000.png",
                "caption": None,
                "identity": "unlisted_0",
                "attributes": None,
            },
        ],
    )
    assert source.describe()["ignored_files"] == {"mp4": 1}
    assert source.describe()["note"] == VIDEO_NOTE


def test_celebv_hq_malformed_info_is_an_error(celebv_hq):
    info = celebv_hq / "celebvhq_info.json"
    info.write_text('{\n "meta_info": {},\n "clips": {,}\n}\n')
    with pytest.raises(SourceError, match=r"celebvhq_info.json:3: not valid JSON"):
        list(open_dataset("celebv_hq", celebv_hq).iter_items())
    broken = json.loads(json.dumps(CELEBV_HQ_INFO))
    broken["clips"]["_0tf2n3rlJU_0"]["attributes"]["appearance"] = [0, 1]
    info.write_text(json.dumps(broken))
    with pytest.raises(SourceError, match=r"celebvhq_info.json: clip '_0tf2n3rlJU_0': malformed attributes"):
        list(open_dataset("celebv_hq", celebv_hq).iter_items())


@pytest.fixture
def celebv_text(tmp_path) -> Path:
    write_text(
        tmp_path,
        "texts/face40_details_new/clipA.txt",
        "\nA young woman has long black hair.  \nShe has long black hair and is young.\n",
    )
    write_text(tmp_path, "texts/emotion/clipA.txt", "She smiles happily.\n")
    write_image(tmp_path, "frames/clipA/frame_0001.png")
    write_image(tmp_path, "frames/clipA/frame_0002.png", 1)
    write_image(tmp_path, "frames/clipB/frame_0001.png", 2)
    write_text(tmp_path, "videos/celebvtext_6/clipA.mp4", "not decoded")
    write_text(tmp_path, "celebvtext_info.json", "{}")
    return tmp_path


def test_celebv_text_caption_is_the_clips_appearance_text(celebv_text):
    source = open_dataset("celebv_text", celebv_text)
    caption = "A young woman has long black hair."
    check_items(
        source,
        [
            {"source_path": "frames/clipA/frame_0001.png", "caption": caption, "identity": "clipA"},
            {"source_path": "frames/clipA/frame_0002.png", "caption": caption, "identity": "clipA"},
            {"source_path": "frames/clipB/frame_0001.png", "caption": None, "identity": "clipB"},
        ],
    )
    assert source.describe()["ignored_files"] == {"json": 1, "mp4": 1}
    assert source.describe()["note"] == VIDEO_NOTE


def test_celebv_text_undecodable_text_names_file_and_line(celebv_text):
    write_text(celebv_text, "texts/face40_details_new/clipB.txt", b"first line\nbad \xff byte\n")
    with pytest.raises(SourceError, match=r"clipB.txt:2: not UTF-8 text"):
        list(open_dataset("celebv_text", celebv_text).iter_items())


def test_vfhq_identity_is_the_person_of_the_video(tmp_path):
    first, second = "Clip+_0Bhs5z3Kzs+P0+C0+F1551-1660", "Clip+_0Bhs5z3Kzs+P1+C2+F10-99"
    write_image(tmp_path, f"{first}/00000000.png")
    write_image(tmp_path, f"{first}/00000001.png", 1)
    write_image(tmp_path, f"{second}/00000000.png", 2)
    write_image(tmp_path, "renamed_clip/00000000.jpg", 3)
    write_text(tmp_path, f"meta_info/{first}.txt", "H: 1080\nW: 1920\nFPS: 25\n")
    source = open_dataset("vfhq", tmp_path)
    check_items(
        source,
        [
            {"source_path": f"{first}/00000000.png", "caption": None, "identity": "_0Bhs5z3Kzs+P0"},
            {"source_path": f"{first}/00000001.png", "caption": None, "identity": "_0Bhs5z3Kzs+P0"},
            {"source_path": f"{second}/00000000.png", "caption": None, "identity": "_0Bhs5z3Kzs+P1"},
            {"source_path": "renamed_clip/00000000.jpg", "caption": None, "identity": "renamed_clip"},
        ],
    )
    assert source.describe()["ignored_files"] == {"txt": 1}
    assert "note" not in source.describe()


def write_labels(root: Path, name: str, rows: list[dict[str, Any]]) -> None:
    (root / "label").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "label" / name)


@pytest.fixture
def cosmicman(tmp_path) -> Path:
    images = "LAION-5B/laion1B-nolang/00000"
    for shade, name in enumerate(["000000001.jpg", "000000002.png", "000000004.jpg"]):
        write_image(tmp_path, f"{images}/{name}", shade)
    aa_text = [
        {"country": "asian", "age": "young", "gender": "woman"},
        None,
        {"background": "street", "x": ""},
        {"pattern": "plain", "material": "cotton", "type": "shirt"},
        {"material": "denim", "type": "jeans"},
        {"material": "cotton"},
    ]
    write_labels(
        tmp_path,
        "laion1B-nolang_0.parquet",
        [
            {
                "path": f"{images}/000000001.jpg",
                "segm_path": "LAION-5B-Pasing/laion1B-nolang/00000/000000001.png",
                "caption": "a young woman on a street",
                "person_type": "portrait",
                "aa_text": json.dumps(aa_text),
            },
            {
                "path": f"{images}/000000002.png",
                "segm_path": "LAION-5B-Pasing/laion1B-nolang/00000/000000002.png",
                "caption": None,
                "person_type": None,
                "aa_text": None,
            },
            {
                "path": f"{images}/000000003",
                "segm_path": "x",
                "caption": "",
                "person_type": None,
                "aa_text": None,
            },
        ],
    )
    write_labels(tmp_path, "laion1B-nolang_1.parquet", [{"path": f"{images}/000000004.jpg", "aa_text": "[]"}])
    return tmp_path


def test_cosmicman_items_come_from_the_parquet_annotations(cosmicman):
    source = open_dataset("cosmicman_hq", cosmicman)
    images = "LAION-5B/laion1B-nolang/00000"
    check_items(
        source,
        [
            {
                "source_path": f"{images}/000000001.jpg",
                "caption": "a young woman on a street",
                "attributes": {
                    "person_type": "portrait",
                    "country": "asian",
                    "age": "young",
                    "gender": "woman",
                    "background": "street",
                    "pattern": "plain",
                    "material": "cotton, denim",
                    "type": "shirt, jeans",
                },
            },
            {"source_path": f"{images}/000000002.png", "caption": None, "attributes": None},
            {"source_path": f"{images}/000000004.jpg", "caption": None, "attributes": {}},
        ],
    )
    assert source.describe()["ignored_files"] == {"<none>": 1}
    assert "not_walked" not in source.describe()


def test_cosmicman_malformed_rows_name_file_and_row(cosmicman):
    write_labels(
        cosmicman, "laion1B-nolang_1.parquet", [{"path": "ok.jpg", "aa_text": "[]"}, {"path": "../x.jpg"}]
    )
    with pytest.raises(
        SourceError, match=r"laion1B-nolang_1.parquet:row 2: `path` '../x.jpg' is not a path inside"
    ):
        list(open_dataset("cosmicman_hq", cosmicman).iter_items())
    write_labels(cosmicman, "laion1B-nolang_1.parquet", [{"path": "ok.jpg", "aa_text": "[{"}])
    with pytest.raises(SourceError, match=r"laion1B-nolang_1.parquet:row 1: `aa_text` is not valid JSON"):
        list(open_dataset("cosmicman_hq", cosmicman).iter_items())
    write_labels(cosmicman, "laion1B-nolang_1.parquet", [{"image": "ok.jpg"}])
    with pytest.raises(SourceError, match=r"laion1B-nolang_1.parquet: no `path` column"):
        list(open_dataset("cosmicman_hq", cosmicman).iter_items())
    (cosmicman / "label/laion1B-nolang_1.parquet").write_bytes(b"not parquet")
    with pytest.raises(SourceError, match="is not a readable Parquet file"):
        list(open_dataset("cosmicman_hq", cosmicman).iter_items())
    (cosmicman / "empty").mkdir()
    with pytest.raises(SourceError, match="no .parquet annotations"):
        list(open_dataset("cosmicman_hq", cosmicman / "empty").iter_items())


def ingest_and_filter(kind: str, root: Path, run_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Run ingest and filter (embedded profile) on a dataset layout: each step's records by source path
    (the kept samples' tar records equal to their Parquet rows)."""
    config = load_config(
        EMBEDDED,
        [
            f"run.run_dir={run_dir}",
            f"ingest.source.kind={kind}",
            f"ingest.source.path={root}",
            f"ingest.source.dataset={kind}",
        ],
    )
    run_ingest(config)
    run_filter(config)
    kept = [record for record in read_records(config.step_dir("filter")) if record["status"] == "ok"]
    assert [sample.record for sample in iter_samples(config.step_dir("filter"))] == kept
    return {
        step: {record["source_path"]: record for record in read_records(config.step_dir(step))}
        for step in ("ingest", "filter")
    }


def dataset_columns(rows: dict[str, dict[str, Any]]) -> dict[str, tuple]:
    return {path: (row["identity"], row["attributes"]) for path, row in rows.items()}


@pytest.mark.slow
def test_vggface2_identities_go_through_ingest_and_filter(local_ray, shared_faces, tmp_path):
    root = tmp_path / "vggface2"
    for relative, photo in {
        "train/n000001/0001_01.jpg": "bulk__Rob_Lowe_0001.jpg",
        "train/n000002/0001_01.jpg": "bulk__Nathalie_Baye_0002.jpg",
        "test/n000003/0001_01.jpg": "images__t1.jpg",
    }.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_faces / photo, root / relative)
    write_image(root, "train/n000002/0002_01.jpg")  # 8x6 px: rejected by ingest
    rows = ingest_and_filter("vggface2", root, tmp_path / "run")

    expected = {path: (PurePosixPath(path).parent.name, None) for path in rows["ingest"]}
    assert len(expected) == 4
    assert dataset_columns(rows["ingest"]) == dataset_columns(rows["filter"]) == expected
    assert {path: row["reject_reason"] for path, row in rows["filter"].items()} == {
        "train/n000001/0001_01.jpg": None,
        "train/n000002/0001_01.jpg": None,
        "test/n000003/0001_01.jpg": "multiple_faces",
        "train/n000002/0002_01.jpg": "too_small",
    }
    assert {path: row["face_embedding_space"] for path, row in rows["filter"].items()} == {
        "train/n000001/0001_01.jpg": "dlib",
        "train/n000002/0001_01.jpg": "dlib",
        "test/n000003/0001_01.jpg": "dlib",
        "train/n000002/0002_01.jpg": None,
    }


@pytest.mark.slow
def test_celeba_identities_and_attributes_go_through_ingest_and_filter(
    local_ray, shared_faces, celeba, tmp_path_factory
):
    shutil.copy(shared_faces / "bulk__Rob_Lowe_0001.jpg", celeba / "img_align_celeba/000001.jpg")
    shutil.copy(shared_faces / "images__t1.jpg", celeba / "img_align_celeba/000002.jpg")
    rows = ingest_and_filter("celeba", celeba, tmp_path_factory.mktemp("run"))

    expected = {
        "img_align_celeba/000001.jpg": ("2880", celeba_attributes({"Arched_Eyebrows", "Smiling", "Young"})),
        "img_align_celeba/000002.jpg": ("2937", celeba_attributes(set())),
        "img_align_celeba/000003.jpg": (None, None),  # not in the annotations
    }
    assert dataset_columns(rows["ingest"]) == dataset_columns(rows["filter"]) == expected
    assert {path: row["reject_reason"] for path, row in rows["filter"].items()} == {
        "img_align_celeba/000001.jpg": None,
        "img_align_celeba/000002.jpg": "multiple_faces",
        "img_align_celeba/000003.jpg": "too_small",
    }
