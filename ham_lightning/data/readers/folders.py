"""Class-per-folder trees (``<dir>/<class>/*``): listing, pre-split ``train/`` ``test/`` and split files.

The class folders and their image files are found by torchvision's ``find_classes`` / ``make_dataset`` (the
``ImageFolder`` rules); on top: hidden folders and files are skipped, files come in natural order within a
class (``img_2`` before ``img_10``), and an empty or missing class folder is an error that names it.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset

from .base import natural_key


def class_dirs(directory: Path) -> list[str]:
    """Sorted names of the sub-folders of ``directory`` (torchvision's ``find_classes``), hidden ones skipped."""
    try:
        classes, _ = find_classes(directory)
    except FileNotFoundError:  # torchvision's "Couldn't find any class folder": the callers say what to do
        return []
    return [name for name in classes if not name.startswith(".")]


def presplit_dirs(directory: Path) -> tuple[Path, Path] | None:
    """``(directory/train, directory/test)`` when both exist."""
    train, test = directory / "train", directory / "test"
    return (train, test) if train.is_dir() and test.is_dir() else None


def scan_classes(directory: Path, class_names: list[str], dataset: str) -> tuple[list[str], np.ndarray]:
    """All image paths under ``directory/<class>/`` (recursively) with the class's index, natural order per class.

    A missing or empty class folder is an error.
    """
    for name in class_names:
        if not (directory / name).is_dir():
            raise FileNotFoundError(f"{dataset}: class folder {directory / name} is missing.")

    def is_visible_image(path: str) -> bool:
        hidden = any(part.startswith(".") for part in Path(path).relative_to(directory).parts)
        return not hidden and has_file_allowed_extension(path, IMG_EXTENSIONS)

    samples = make_dataset(directory, {name: i for i, name in enumerate(class_names)},
                           is_valid_file=is_visible_image, allow_empty=True)
    per_class: list[list[str]] = [[] for _ in class_names]
    for path, label in samples:
        per_class[label].append(path)
    paths: list[str] = []
    labels: list[int] = []
    for label, (name, files) in enumerate(zip(class_names, per_class, strict=True)):
        if not files:
            raise ValueError(
                f"{dataset}: class folder {directory / name} has no images (looked for {', '.join(IMG_EXTENSIONS)}). "
                "Add its images or remove the folder."
            )
        paths += sorted(files, key=natural_key)
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def check_same_classes(train_dir: Path, test_dir: Path, dataset: str) -> list[str]:
    """The class list of a pre-split tree; ``train/`` and ``test/`` must hold the same class folders."""
    train, test = class_dirs(train_dir), class_dirs(test_dir)
    if train != test:
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise ValueError(
            f"{dataset}: {train_dir} and {test_dir} must hold the same class folders; "
            f"only in train/: {only_train[:10]}, only in test/: {only_test[:10]}."
        )
    return train


def read_split_file(split_file: str | os.PathLike[str], base: Path) -> tuple[list[str], list[str] | None]:
    """Relative paths (``<class>/<file>``) of the train images, and of the test images if the file names them.

    Two formats: JSON ``{"train": [...], "test": [...]}``, or text with one training image per line (first
    whitespace-separated field; a trailing label is ignored, the class is the folder), the rest being test.
    Paths are relative to ``base`` (a leading ``<base name>/`` or an absolute path under ``base`` is accepted).
    """
    path = Path(split_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"split_file {path} does not exist.")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            content = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"split_file {path} is not valid JSON: {err}.") from err
        if not isinstance(content, dict) or not isinstance(content.get("train"), list) or not isinstance(
            content.get("test"), list
        ):
            raise ValueError(f'split_file {path} must be a JSON object {{"train": [paths], "test": [paths]}}.')
        return [_relative(p, base) for p in content["train"]], [_relative(p, base) for p in content["test"]]
    lines = [line.split()[0] for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [_relative(p, base) for p in lines], None


def _relative(entry: str, base: Path) -> str:
    entry = str(entry).strip().replace("\\", "/")
    if os.path.isabs(entry):
        try:
            return Path(entry).resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            return entry
    while entry.startswith("./"):
        entry = entry[2:]
    prefix = base.name + "/"
    return entry[len(prefix):] if entry.startswith(prefix) else entry


def zip_presplit(archive: Path) -> tuple[str, dict[str, dict[str, list[str]]]]:
    """Find ``train/`` and ``test/`` inside a zip (at its top or one folder down) and list their class folders.

    Returns the prefix (``""`` or ``"<top>/"``) and, per split, ``{class: [members]}`` with members in natural
    order; hidden entries and non-image files are skipped. Raises `FileNotFoundError` naming the layout looked for.
    """
    with zipfile.ZipFile(archive) as handle:
        members = [m for m in handle.namelist() if not m.endswith("/")]
    tops = sorted({""} | {m.split("/", 1)[0] + "/" for m in members if "/" in m})
    for prefix in tops:
        found: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
        for member in members:
            if not member.startswith(prefix):
                continue
            parts = member[len(prefix):].split("/")
            if len(parts) < 3 or parts[0] not in found or any(part.startswith(".") for part in parts):
                continue
            if has_file_allowed_extension(parts[-1], IMG_EXTENSIONS):
                found[parts[0]].setdefault(parts[1], []).append(member)
        if found["train"] and found["test"]:
            for split in found.values():
                for files in split.values():
                    files.sort(key=natural_key)
            return prefix, found
    raise FileNotFoundError(f"{archive} holds no train/<class>/<image> and test/<class>/<image> at its top or one "
                            "folder down")
