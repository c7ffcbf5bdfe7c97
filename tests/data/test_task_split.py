"""Cutting the ordered classes into tasks: sizes, contiguous ranges, and the errors for splits that do not fit."""

from __future__ import annotations

import pytest

from ham_lightning.data import task_ranges, task_sizes


@pytest.mark.parametrize(
    ("args", "sizes"),
    [
        (dict(num_classes=100, num_tasks=10), [10] * 10),
        (dict(num_classes=100, num_tasks=20), [5] * 20),
        (dict(num_classes=200, increment=20), [20] * 10),
        (dict(num_classes=100, num_tasks=10, increment=10), [10] * 10),
        (dict(num_classes=100, increment=10, initial_classes=50), [50] + [10] * 5),
        (dict(num_classes=100, num_tasks=6, initial_classes=50), [50] + [10] * 5),
        (dict(num_classes=10, num_tasks=1), [10]),
        (dict(num_classes=10, num_tasks=1, initial_classes=10), [10]),
        (dict(num_classes=10, increment=10), [10]),
        (dict(num_classes=7, increment=1), [1] * 7),
    ],
)
def test_sizes(args: dict, sizes: list[int]) -> None:
    assert task_sizes(**args) == sizes


def test_ranges_are_contiguous_disjoint_and_cover_all_classes() -> None:
    sizes = task_sizes(100, increment=10, initial_classes=40)
    ranges = task_ranges(sizes)
    assert [len(r) for r in ranges] == sizes
    assert ranges[0] == range(0, 40) and ranges[1] == range(40, 50) and ranges[-1] == range(90, 100)
    flat = [c for r in ranges for c in r]
    assert flat == list(range(100))
    for a, b in zip(ranges, ranges[1:]):
        assert a.stop == b.start


def test_num_tasks_that_does_not_divide_gives_sizes_that_differ_by_at_most_one() -> None:
    sizes = task_sizes(43, num_tasks=10)
    assert sizes == [5, 5, 5, 4, 4, 4, 4, 4, 4, 4] and sum(sizes) == 43
    for classes, tasks in ((100, 7), (187, 20), (187, 50), (10, 3), (11, 11)):
        sizes = task_sizes(classes, num_tasks=tasks)
        assert len(sizes) == tasks and sum(sizes) == classes and max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)
    ranges = task_ranges(task_sizes(43, num_tasks=10))
    assert sorted(c for r in ranges for c in r) == list(range(43))  # every class once


def test_more_tasks_than_classes() -> None:
    with pytest.raises(ValueError, match=r"num_tasks=20 is more than the 10 classes"):
        task_sizes(10, num_tasks=20)


def test_increment_that_does_not_divide() -> None:
    with pytest.raises(ValueError, match=r"increment=30 does not divide the 100 classes\. Increments that divide "
                                         r"100 classes: 1 \(100 tasks\)"):
        task_sizes(100, increment=30)
    with pytest.raises(ValueError, match=r"increment=200 does not divide the 100 classes"):
        task_sizes(100, increment=200)


def test_initial_classes_leaving_a_ragged_rest() -> None:
    with pytest.raises(ValueError, match=r"the 50 classes left after initial_classes=50.*"
                                         r"Increments that divide 50: 1 \(51 tasks\), 2 \(26 tasks\)"):
        task_sizes(100, increment=15, initial_classes=50)
    assert task_sizes(100, num_tasks=4, initial_classes=50) == [50, 17, 17, 16]  # the rest is split evenly
    with pytest.raises(ValueError, match=r"num_tasks=4 with initial_classes=98 leaves 2 classes for 3 tasks"):
        task_sizes(100, num_tasks=4, initial_classes=98)
    with pytest.raises(ValueError, match=r"num_tasks=1 with initial_classes=50 leaves 50"):
        task_sizes(100, num_tasks=1, initial_classes=50)
    with pytest.raises(ValueError, match="more than the 100 classes"):
        task_sizes(100, num_tasks=2, initial_classes=120)


def test_disagreeing_and_missing_arguments() -> None:
    with pytest.raises(ValueError, match=r"num_tasks=5 and increment=10 disagree.*make 10 tasks"):
        task_sizes(100, num_tasks=5, increment=10)
    with pytest.raises(ValueError, match="give num_tasks or increment"):
        task_sizes(100)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="must be a positive integer"):
            task_sizes(100, num_tasks=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no classes"):
        task_sizes(0, num_tasks=1)
