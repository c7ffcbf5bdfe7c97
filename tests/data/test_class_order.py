"""Class orders: PyCIL's seeded permutation, natural order, explicit lists, and their errors."""

from __future__ import annotations

import numpy as np
import pytest

from ham_lightning.data import DEFAULT_SEED, resolve_class_order, seed_class_order


def numpy_permutation(num_classes: int, seed: int) -> list[int]:
    """What PyCIL / LAMDA-PILOT write: ``np.random.seed(seed); np.random.permutation(C)``."""
    np.random.seed(seed)
    return np.random.permutation(num_classes).tolist()


@pytest.mark.parametrize("num_classes", [10, 100, 200])
def test_seed_1993_is_numpys_legacy_permutation(num_classes: int) -> None:
    assert DEFAULT_SEED == 1993
    order = seed_class_order(num_classes)
    assert order == numpy_permutation(num_classes, 1993)
    assert all(type(c) is int for c in order)
    # Not what the modern generator or torch would give: the legacy global generator is the convention.
    assert order != np.random.default_rng(1993).permutation(num_classes).tolist()


def test_seed_order_matches_published_cifar100_prefix() -> None:
    # The first classes of PyCIL's CIFAR-100 order with seed 1993, as printed in its logs.
    assert seed_class_order(100, 1993)[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]


def test_other_seeds_and_global_state_untouched() -> None:
    assert seed_class_order(50, 0) == numpy_permutation(50, 0)
    assert seed_class_order(50, 7) != seed_class_order(50, 0)
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    seed_class_order(100, 1993)
    assert np.random.rand() == expected_next, "building a class order must not disturb NumPy's global RNG"


def test_resolve_seed_natural_and_explicit() -> None:
    assert resolve_class_order("seed", 20, seed=5) == numpy_permutation(20, 5)
    assert resolve_class_order("natural", 5) == [0, 1, 2, 3, 4]
    assert resolve_class_order([2, 0, 1], 3) == [2, 0, 1]
    assert resolve_class_order(np.array([1, 0, 2]), 3) == [1, 0, 2]
    assert resolve_class_order((1, 2, 0), 3) == [1, 2, 0]


@pytest.mark.parametrize(
    ("order", "match"),
    [
        ([0, 1, 1, 3], r"not a permutation of 0\.\.3.*missing \[2\].*duplicated \[1\]"),
        ([0, 1, 2], r"not a permutation of 0\.\.3: it has 3 entries for 4 classes; missing \[3\]"),
        ([0, 1, 2, 4], r"not a permutation.*missing \[3\].*out of range \[4\]"),
        ([0, 1, 2, 3, 3], r"5 entries for 4 classes.*duplicated \[3\]"),
        ([-1, 0, 1, 2], r"out of range \[-1\]"),
    ],
)
def test_not_a_permutation_is_refused(order: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_class_order(order, 4)


def test_non_integer_orders_and_unknown_names() -> None:
    with pytest.raises(ValueError, match="integers only"):
        resolve_class_order([0.0, 1.0], 2)
    with pytest.raises(ValueError, match="integers only"):
        resolve_class_order([True, False], 2)
    with pytest.raises(ValueError, match="'seed', 'natural' or a list"):
        resolve_class_order("random", 2)
