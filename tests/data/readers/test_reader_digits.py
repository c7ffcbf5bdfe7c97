"""The embedded default: scikit-learn's real handwritten digits, no download, no root."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from ham_lightning.data import ReadOptions, build_reader


def test_digits_are_sklearns_images_split_per_class() -> None:
    reader = build_reader("digits", None)
    assert reader.num_classes == 10 and reader.class_names == [str(d) for d in range(10)]
    assert reader.split == "seeded_80_20" and reader.source == "digits"
    train, test = reader.load("train"), reader.load("test")
    reference = load_digits()
    assert len(train.labels) + len(test.labels) == len(reference.target) == 1797
    counts = np.bincount(reference.target)
    assert np.bincount(test.labels).tolist() == [int(round(c * 0.2)) for c in counts]
    assert train.images is not None and train.images.shape[1:] == (8, 8, 3) and train.images.dtype == np.uint8
    # every image is the sklearn image at the position its name gives, scaled 0..16 -> 0..255, grey as RGB
    for data in (train, test):
        assert data.images is not None
        for k in (0, 7, len(data.labels) - 1):
            position = int(data.names[k][len("digits["):-1])
            expected = np.rint(reference.images[position] * 255 / 16).astype(np.uint8)
            assert (data.images[k][..., 0] == expected).all() and (data.images[k][..., 2] == expected).all()
            assert data.labels[k] == reference.target[position]
    assert set(train.names).isdisjoint(test.names)


def test_split_seed_and_limits() -> None:
    base = build_reader("digits", None).load("test").names
    assert build_reader("digits", None).load("test").names == base
    assert build_reader("digits", None, ReadOptions(split_seed=1)).load("test").names != base
    limited = build_reader("digits", None, ReadOptions(limit_per_class_train=5, limit_per_class_test=2))
    assert np.bincount(limited.load("train").labels).tolist() == [5] * 10
    assert np.bincount(limited.load("test").labels).tolist() == [2] * 10
