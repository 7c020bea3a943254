"""Caption text: the quality checks and their flags, token budgets (approximate and real tokenizers),
a shard's caption stats and the attribute captioner's sentences."""

from __future__ import annotations

import pytest

from captioning.attribute import attribute_caption
from captioning.config import CaptionQuality
from captioning.quality import CaptionChecker, caption_stats

KEEP_ALL = CaptionQuality(drop=[])


@pytest.mark.parametrize("text", [None, "", "   \n\t", "...", " , ! ? "])
def test_blank_or_punctuation_only_captions_are_dropped_as_empty(text):
    assert CaptionChecker(KEEP_ALL).check(text) == (None, ["empty"])


def test_whitespace_is_normalised():
    assert CaptionChecker(KEEP_ALL).check("  a woman\n\n smiling\tat   the camera ") == (
        "a woman smiling at the camera",
        [],
    )


@pytest.mark.parametrize(
    "text",
    [
        "a man a man a man a man",
        "smiling smiling smiling",
        "a woman with long hair, long hair, long hair, long hair",
        "portrait of a woman woman woman woman woman",
    ],
)
def test_degenerate_repetition_is_flagged(text):
    assert CaptionChecker(KEEP_ALL).check(text)[1] == ["repetition"]


@pytest.mark.parametrize(
    "text",
    [
        "a woman in a red hat and a blue scarf standing in a park",
        "the face of the woman in the photo is lit from the left",
        "a very very happy woman with short dark hair",  # 2 of 8 words repeated
    ],
)
def test_words_that_recur_apart_or_rarely_are_not_repetition(text):
    assert CaptionChecker(KEEP_ALL).check(text) == (text, [])


@pytest.mark.parametrize(
    "text",
    [
        "two women smiling at the camera",
        "a man and a woman on a beach",
        "a man and his young son",
        "a group of people at a party",
        "a young couple in a cafe",
        "a crowd behind the singer",
        "they are smiling at the camera",
        "a woman standing next to another woman",
        "a mother with her daughter",
        "a man holding a baby",
        "a family photo",
    ],
)
def test_captions_of_several_people_are_flagged(text):
    assert CaptionChecker(KEEP_ALL).check(text) == (text, ["multiple_people"])


@pytest.mark.parametrize(
    "text",
    [
        "a person",
        "a close-up of a woman's face",
        "a man with a beard and glasses",
        "a woman reading a menu",
        "a woman holding a couple of flowers",
        "a woman with a baby face",
        "a man with a child's toy",
        "a girl with a child-like smile and both hands raised",
    ],
)
def test_one_person_is_not_multiple_people(text):
    assert CaptionChecker(KEEP_ALL).check(text) == (text, [])


def test_flags_in_drop_null_the_caption_but_are_still_reported():
    checker = CaptionChecker(CaptionQuality())  # drops repetition and multiple_people
    assert checker.check("two women smiling") == (None, ["multiple_people"])
    assert checker.check("smiling smiling smiling") == (None, ["repetition"])
    only_repetition = CaptionChecker(CaptionQuality(drop=["repetition"]))
    assert only_repetition.check("two women smiling") == ("two women smiling", ["multiple_people"])


def test_approximate_budgets_count_words_and_punctuation_plus_special_tokens():
    # 8 tokens: a | woman | , | smiling | at | the | camera | .   (+1 T5 end token, +2 CLIP tokens)
    text = "a woman, smiling at the camera."
    fits = CaptionChecker(CaptionQuality(t5_max_tokens=9, clip_max_tokens=10))
    assert fits.check(text) == (text, [])
    over_clip = CaptionChecker(CaptionQuality(t5_max_tokens=9, clip_max_tokens=9))
    assert over_clip.check(text) == (text, ["over_clip"])
    cut = CaptionChecker(CaptionQuality(t5_max_tokens=6, clip_max_tokens=6))
    assert cut.check(text) == ("a woman, smiling at", ["truncated_t5", "over_clip"])
    cut_after_comma = CaptionChecker(CaptionQuality(t5_max_tokens=4, clip_max_tokens=77))
    assert cut_after_comma.check(text) == ("a woman,", ["truncated_t5"])


@pytest.fixture(scope="module")
def tiny_tokenizers(tmp_path_factory):
    """A FLUX-like folder with the tiny character-level CLIP and T5 tokenizers of infu.model.tiny."""
    from infu.model.tiny import tiny_clip_tokenizer, tiny_t5_tokenizer

    folder = tmp_path_factory.mktemp("flux")
    tiny_clip_tokenizer().save_pretrained(folder / "tokenizer")
    tiny_t5_tokenizer().save_pretrained(folder / "tokenizer_2")
    return folder


def test_real_tokenizers_count_tokens_and_cut_on_a_token_boundary(tiny_tokenizers):
    # The tiny tokenizers split "a man, smiling." into 13 tokens, one per non-space character.
    text = "a man, smiling."
    roomy = CaptionChecker(CaptionQuality(tokenizers=tiny_tokenizers, t5_max_tokens=14, clip_max_tokens=15))
    assert roomy.check(text) == (text, [])
    assert CaptionChecker(CaptionQuality(t5_max_tokens=6, clip_max_tokens=7)).check(text) == (text, [])
    tight = CaptionChecker(CaptionQuality(tokenizers=tiny_tokenizers, t5_max_tokens=6, clip_max_tokens=6))
    assert tight.check(text) == ("a man,", ["truncated_t5", "over_clip"])  # 5 + end; 5 + start + end
    mid_word = CaptionChecker(CaptionQuality(tokenizers=tiny_tokenizers, t5_max_tokens=4, clip_max_tokens=77))
    assert mid_word.check(text) == ("a ma", ["truncated_t5"])


def test_caption_stats_per_source():
    rows = [
        {
            "key": "k1",
            "attribute": "a smiling young woman",
            "small": None,
            "flags": {"small": ["multiple_people"]},
        },
        {
            "key": "k2",
            "attribute": "a photo of a person facing the camera with eyeglasses, today",
            "small": None,
            "flags": {"small": ["empty"], "attribute": ["over_clip"]},
        },
        {"key": "k3", "attribute": None, "small": "A woman", "flags": {"small": ["over_clip"]}},
    ]
    stats = caption_stats(rows, ["attribute", "small"])
    bins = ["0-4", "5-9", "10-19", "20-39", "40-79", "80-159", "160+"]
    assert stats == {
        "attribute": {
            "count": 2,
            "dropped": 0,
            "missing": 1,
            "flags": {"over_clip": 1},
            "length_histogram": {"bins": bins, "counts": [1, 0, 1, 0, 0, 0, 0]},
            "vocabulary": 13,
            "mean_words": 7.5,
        },
        "small": {
            "count": 1,
            "dropped": 2,
            "missing": 0,
            "flags": {"empty": 1, "multiple_people": 1, "over_clip": 1},
            "length_histogram": {"bins": bins, "counts": [1, 0, 0, 0, 0, 0, 0]},
            "vocabulary": 2,
            "mean_words": 2.0,
        },
    }


CELEBA_ATTRIBUTES = {
    "Male": "false",
    "Young": "true",
    "Smiling": "true",
    "Eyeglasses": "true",
    "No_Beard": "true",
    "Bald": "false",
    "Wearing_Hat": "false",
}


@pytest.mark.parametrize(
    ("record", "grayscale", "sentence"),
    [
        (
            {
                "key": "ffhq-000001",
                "attributes": CELEBA_ATTRIBUTES,
                "scores": {"face_area_ratio": 0.3},
                "faces": [{"bbox": [0, 0, 10, 10], "yaw": 4.0, "pitch": -3.0}],
            },
            False,
            "a close-up photo of a smiling young woman with eyeglasses, facing the camera",
        ),
        (  # CelebV-HQ: positive labels only, one emotion; framing from the bbox; yaw > 0: image's right
            {
                "key": "celebvhq-000001",
                "attributes": {
                    "Male": "true",
                    "blonde_hair": "true",
                    "wearing_hat": "true",
                    "emotion": "neutral",
                },
                "width": 100,
                "height": 100,
                "faces": [{"bbox": [10, 10, 40, 40], "yaw": 35.0, "pitch": -20.0}],
            },
            True,
            "a black and white portrait photo of a man with blond hair and a neutral expression "
            "wearing a hat, turned to the right and looking down",
        ),
        (  # a gender and an age value; several emotions over a clip say nothing about one frame
            {
                "key": "cosmic-000001",
                "attributes": {
                    "gender": "male",
                    "age": "70",
                    "emotion": "happy, neutral",
                    "No_Beard": "false",
                },
                "scores": {"face_area_ratio": 0.02, "yaw": -25.0},
            },
            False,
            "a half-length photo of an elderly man with a beard, turned to the left",
        ),
        (
            {"key": "child-000001", "attributes": {"age": "7", "emotion": "happy"}},
            False,
            "a photo of a happy child",
        ),
        (
            {"key": "bare-000001", "attributes": None, "faces": None, "scores": None},
            False,
            "a photo of a person",
        ),
    ],
)
def test_attribute_captions(record, grayscale, sentence):
    assert attribute_caption(record, grayscale=grayscale) == sentence


def test_attribute_phrasing_varies_per_key_and_seed_deterministically():
    record = {"attributes": {"Male": "true"}, "scores": {"face_area_ratio": 0.01}}
    both = {"a photo of a man", "a picture of a man"}
    assert {attribute_caption(dict(record, key=f"k{index}")) for index in range(20)} == both
    assert {attribute_caption(dict(record, key="k1"), seed=seed) for seed in range(20)} == both
    assert attribute_caption(dict(record, key="k1"), seed=3) == attribute_caption(
        dict(record, key="k1"), seed=3
    )
