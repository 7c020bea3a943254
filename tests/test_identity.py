"""Held-out identities and identity clusters: synthetic embeddings and the real dlib backend.

Measured with dlib on the sample corpus (normalised descriptors, cosine): same person 0.969-1.0
(person_2/watermark 0.969, person_3/grayscale 0.997, person_4/cmyk 0.999); different people 0.78-0.917
(closest: person_3 vs person_4's CMYK copy 0.917, person_3 vs person_4 0.913). LFW photos in
../shared: Rob_Lowe_0001/0002 0.960, Nathalie_Baye_0002 vs Rob Lowe 0.80, but 0.926 vs person_0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from filtering import identity
from filtering.identity import HeldOutIdentities, cluster_identities
from infu.face import SAME_IDENTITY_SIMILARITY, FaceAnalyzer, FaceConfig, load_face_analyzer
from infu.sample_corpus import build_sample_corpus

DLIB_THRESHOLD = SAME_IDENTITY_SIMILARITY["dlib"]
PEOPLE = [f"people/person_{index}.jpg" for index in range(6)] + ["people/astronaut.png"]
VARIANTS = {"variants/grayscale.jpg": 3, "variants/cmyk.jpg": 4, "variants/watermark.jpg": 2}


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def _reference_leader_clusters(keys: list[str], embeddings: np.ndarray, threshold: float) -> dict[str, int]:
    """Plain sequential leader clustering in key order: what the blocked version must reproduce."""
    leaders: list[np.ndarray] = []
    clusters = {}
    for key in sorted(keys):
        vector = _unit(embeddings[keys.index(key)])
        similarities = [float(vector @ leader) for leader in leaders]
        best = int(np.argmax(similarities)) if leaders else -1
        if best >= 0 and similarities[best] >= threshold:
            clusters[key] = best
        else:
            clusters[key] = len(leaders)
            leaders.append(vector)
    return clusters


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_clusters_match_sequential_leader_clustering(monkeypatch, block):
    monkeypatch.setattr(identity, "_BLOCK", block)
    rng = np.random.default_rng(5)
    centres = _unit(rng.normal(size=(12, 32)))
    embeddings = np.repeat(centres, 25, axis=0) + 0.35 * rng.normal(size=(300, 32)) / np.sqrt(32)
    keys = [f"k{index:04d}" for index in rng.permutation(300)]
    clusters = cluster_identities(keys, embeddings, 0.8, dataset="ds")
    expected = _reference_leader_clusters(keys, embeddings, 0.8)
    assert clusters == [f"ds-c{expected[key]:06d}" for key in keys]
    assert len(set(clusters)) >= 12


def test_cluster_ids_do_not_depend_on_row_order():
    rng = np.random.default_rng(2)
    embeddings = np.repeat(_unit(rng.normal(size=(40, 16))), 5, axis=0) + 0.02 * rng.normal(size=(200, 16))
    keys = [f"key-{index}" for index in range(200)]
    clusters = cluster_identities(keys, embeddings, 0.9, dataset="ffhq")
    assert len(set(clusters)) == 40 and clusters[0] == "ffhq-c000000"
    assert all(len(set(clusters[start : start + 5])) == 1 for start in range(0, 200, 5))
    order = rng.permutation(200)
    shuffled = cluster_identities([keys[i] for i in order], embeddings[order], 0.9, dataset="ffhq")
    assert shuffled == [clusters[i] for i in order]
    assert cluster_identities([], np.empty((0, 16)), 0.9, dataset="ffhq") == []


def test_held_out_match_on_synthetic_embeddings():
    rng = np.random.default_rng(1)
    people = _unit(rng.normal(size=(3, 64)))
    held_out = HeldOutIdentities.from_embeddings(["ann", "ann", "bob"], 3 * people)
    assert np.allclose(np.linalg.norm(held_out.embeddings, axis=1), 1.0)
    names, similarities = held_out.match(np.stack([people[1], people[2], -people[0]]), threshold=0.9)
    assert names.tolist() == ["ann", "bob", None]
    np.testing.assert_allclose(similarities[:2], 1.0, atol=1e-5)
    assert held_out.default_threshold == DLIB_THRESHOLD
    empty = HeldOutIdentities.from_embeddings([], np.empty((0, 64)))
    names, similarities = empty.match(people)
    assert names.tolist() == [None] * 3 and similarities.tolist() == [-1.0] * 3
    with pytest.raises(ValueError, match="2 names for 3"):
        HeldOutIdentities.from_embeddings(["a", "b"], people)


@pytest.fixture(scope="module")
def dlib_analyzer() -> FaceAnalyzer:
    return load_face_analyzer(FaceConfig(backend="dlib"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    build_sample_corpus(root)
    return root


@pytest.fixture(scope="module")
def corpus_embeddings(dlib_analyzer, corpus) -> dict[str, np.ndarray]:
    return {name: dlib_analyzer.require_largest(corpus / name).embedding for name in [*PEOPLE, *VARIANTS]}


def test_dlib_similarities_on_the_corpus(corpus_embeddings):
    people = np.stack([corpus_embeddings[name] for name in PEOPLE])
    between_people = people @ people.T
    assert between_people[~np.eye(len(PEOPLE), dtype=bool)].max() < DLIB_THRESHOLD  # measured 0.913
    for variant, person in VARIANTS.items():
        same = float(corpus_embeddings[variant] @ corpus_embeddings[PEOPLE[person]])
        assert same > 0.95  # measured 0.969-0.999
        others = [float(corpus_embeddings[variant] @ people[i]) for i in range(len(PEOPLE)) if i != person]
        assert max(others) < DLIB_THRESHOLD  # measured 0.917


def test_held_out_person_3_matches_only_its_grayscale_copy(dlib_analyzer, corpus, corpus_embeddings):
    held_out = HeldOutIdentities.from_images(dlib_analyzer, {"person_3": [corpus / "people/person_3.jpg"]})
    assert held_out.embedding_space == "dlib" and held_out.embeddings.shape == (1, 128)
    candidates = [name for name in corpus_embeddings if name != "people/person_3.jpg"]
    names, similarities = held_out.match(np.stack([corpus_embeddings[name] for name in candidates]))
    matched = {candidate: name for candidate, name in zip(candidates, names, strict=True) if name}
    assert matched == {"variants/grayscale.jpg": "person_3"}
    assert similarities[candidates.index("variants/grayscale.jpg")] > 0.97  # a mirrored grayscale copy


def test_corpus_clusters_group_each_person_with_its_variants(corpus_embeddings):
    names = list(corpus_embeddings)
    clusters = dict(
        zip(
            names,
            cluster_identities(
                names, np.stack(list(corpus_embeddings.values())), DLIB_THRESHOLD, dataset="sample"
            ),
            strict=True,
        )
    )
    assert len({clusters[name] for name in PEOPLE}) == len(PEOPLE)
    for variant, person in VARIANTS.items():
        assert clusters[variant] == clusters[PEOPLE[person]]
    assert len(set(clusters.values())) == len(PEOPLE)


def test_exif_rotated_variant_clusters_with_person_5(dlib_analyzer, corpus, corpus_embeddings):
    rotated = dlib_analyzer.require_largest(corpus / "variants/exif_rotated.jpg").embedding
    names = [*PEOPLE, "variants/exif_rotated.jpg"]
    embeddings = np.stack([*(corpus_embeddings[name] for name in PEOPLE), rotated])
    clusters = cluster_identities(names, embeddings, DLIB_THRESHOLD, dataset="sample")
    assert clusters[-1] == clusters[5] and len(set(clusters)) == len(PEOPLE)


@pytest.mark.shared_data
def test_real_photos_cluster_by_person(dlib_analyzer, shared_faces):
    names = ["bulk__Rob_Lowe_0001.jpg", "bulk__Rob_Lowe_0002.jpg", "bulk__Nathalie_Baye_0002.jpg"]
    embeddings = np.stack([dlib_analyzer.require_largest(shared_faces / name).embedding for name in names])
    rob_lowe, rob_lowe_again, nathalie_baye = cluster_identities(
        names, embeddings, DLIB_THRESHOLD, dataset="lfw"
    )
    assert rob_lowe == rob_lowe_again != nathalie_baye
    held_out = HeldOutIdentities.from_images(dlib_analyzer, {"Rob Lowe": shared_faces / names[0]})
    matched, similarities = held_out.match(embeddings[1:])
    assert matched.tolist() == ["Rob Lowe", None]
    assert similarities[0] > 0.95 and similarities[1] < 0.85  # measured 0.960, 0.803
