"""Task splits: how the ordered classes of a scenario are cut into contiguous tasks."""

from __future__ import annotations


def task_sizes(
    num_classes: int,
    num_tasks: int | None = None,
    increment: int | None = None,
    initial_classes: int | None = None,
) -> list[int]:
    """Classes per task, PyCIL style: the first task has ``initial_classes``, every later one ``increment``.

    Give ``num_tasks`` or ``increment`` (or both, consistent). With ``num_tasks``, classes that do not divide
    into the tasks give tasks whose sizes differ by at most one (the larger ones first, as ``np.array_split``):
    43 classes in 10 tasks are 3 tasks of 5 and 7 of 4. With ``increment`` the classes must divide exactly (a
    ragged last task is refused rather than made silently, and the error lists the choices that would work).
    """
    if num_classes < 1:
        raise ValueError(f"the data set has no classes (num_classes={num_classes}).")
    for name, value in (("num_tasks", num_tasks), ("increment", increment), ("initial_classes", initial_classes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if num_tasks is None and increment is None:
        raise ValueError("give num_tasks or increment to split the classes into tasks.")
    if initial_classes is not None and initial_classes > num_classes:
        raise ValueError(f"initial_classes={initial_classes} is more than the {num_classes} classes of the data set.")

    if increment is None:
        assert num_tasks is not None
        if initial_classes is None:
            if num_tasks > num_classes:
                raise ValueError(f"num_tasks={num_tasks} is more than the {num_classes} classes; every task needs "
                                 f"at least one class (num_tasks <= {num_classes}).")
            return even_sizes(num_classes, num_tasks)
        rest = num_classes - initial_classes
        if num_tasks == 1:
            if rest:
                raise ValueError(
                    f"num_tasks=1 with initial_classes={initial_classes} leaves {rest} of the {num_classes} "
                    "classes without a task; use initial_classes=num_classes or more tasks."
                )
            return [initial_classes]
        if rest < num_tasks - 1:
            raise ValueError(
                f"num_tasks={num_tasks} with initial_classes={initial_classes} leaves {rest} classes for "
                f"{num_tasks - 1} tasks; every task needs at least one class."
            )
        return [initial_classes] + even_sizes(rest, num_tasks - 1)

    first = increment if initial_classes is None else initial_classes
    rest = num_classes - first
    if rest < 0 or rest % increment:
        if initial_classes is None:
            what, hint = f"the {num_classes} classes", _valid_equal_splits(num_classes)
        else:
            what = f"the {rest} classes left after initial_classes={initial_classes}"
            hint = f"Increments that divide {rest}: {_divisors_with_tasks(rest, first_tasks=1)}."
        raise ValueError(f"increment={increment} does not divide {what}. {hint}")
    sizes = [first] + [increment] * (rest // increment)
    if num_tasks is not None and num_tasks != len(sizes):
        raise ValueError(
            f"num_tasks={num_tasks} and increment={increment} disagree: {num_classes} classes with "
            f"initial_classes={first} and increment={increment} make {len(sizes)} tasks. Give only one of them."
        )
    return sizes


def even_sizes(num_classes: int, num_tasks: int) -> list[int]:
    """``num_classes`` cut into ``num_tasks`` sizes that differ by at most one, the larger ones first."""
    base, extra = divmod(num_classes, num_tasks)
    return [base + 1] * extra + [base] * (num_tasks - extra)


def task_ranges(sizes: list[int]) -> list[range]:
    """Global class indices of each task: task ``t`` owns a contiguous range."""
    ranges, start = [], 0
    for size in sizes:
        ranges.append(range(start, start + size))
        start += size
    return ranges


def _divisors_with_tasks(n: int, first_tasks: int = 0) -> str:
    """Divisors of ``n`` with the task count each gives (plus ``first_tasks`` for an initial task)."""
    if n <= 0:
        return "none"
    parts = []
    for d in range(1, n + 1):
        if n % d == 0:
            tasks = n // d + first_tasks
            parts.append(f"{d} ({tasks} task{'s' if tasks != 1 else ''})")
    return ", ".join(parts)


def _valid_equal_splits(num_classes: int) -> str:
    return f"Increments that divide {num_classes} classes: {_divisors_with_tasks(num_classes)}."
