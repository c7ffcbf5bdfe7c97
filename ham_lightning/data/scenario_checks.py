"""Checks of a class-incremental scenario before anything is built: what cannot work is refused with what the
user probably meant (`ClassIncrementalDataModule` calls them from its constructor)."""

from __future__ import annotations

from .task_split import task_sizes


def check_scenario(dataset: str, root: str | None, num_classes: int, class_names: list[str] | None,
                   num_tasks: int | None, increment: int | None, initial_classes: int | None) -> None:
    """Refuse, before any training, a scenario that cannot work, and say what the user probably meant.

    Fewer than 2 classes is an error (often ``root`` one level too high: a single folder holding the class
    folders, or ``train/`` and ``test/``); a task of a single class is warned about (with the current-task logit
    mask its loss is identically 0, so it learns nothing), naming the ``num_tasks`` that give 2+ classes a task.
    """
    import warnings
    from pathlib import Path

    names = list(class_names or [])
    if num_classes < 2:
        hint = ""
        if root is not None and len(names) == 1:
            inner = Path(root) / names[0]
            sub = sorted(p.name for p in inner.iterdir() if p.is_dir()) if inner.is_dir() else []
            if sub:
                hint = (f" {root} holds one folder, {names[0]}/, which holds folders ({', '.join(sub[:4])}"
                        f"{', ...' if len(sub) > 4 else ''}): did you mean --data.root {inner}?")
        raise ValueError(f"{dataset}: found {num_classes} class(es) {names[:3]} under {root}; class-incremental "
                         f"learning needs at least 2 classes.{hint}")
    try:
        sizes = task_sizes(num_classes, num_tasks, increment, initial_classes)
    except ValueError:
        return  # task_sizes' own error, raised by the caller, says what divides
    single = [t for t, n in enumerate(sizes) if n < 2]
    if single:
        fits = [k for k in range(1, num_classes // 2 + 1) if num_classes % k == 0]
        warnings.warn(
            f"{dataset}: {len(single)} of the {len(sizes)} tasks have a single class (tasks {single[:5]}"
            f"{' ...' if len(single) > 5 else ''}); such a task learns nothing with the default current-task "
            f"logit mask. For {num_classes} classes, --data.num_tasks {max(fits)} gives "
            f"{num_classes // max(fits)} classes a task (any of {fits[-4:]} works).",
            UserWarning, stacklevel=3)


def check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
