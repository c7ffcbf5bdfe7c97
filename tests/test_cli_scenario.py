"""Scenarios that cannot work are refused (or warned about) when the datamodule is built, before any training,
saying what the user probably meant."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ham_lightning.data import ClassIncrementalDataModule


def _class_folders(base: Path, classes: list[str], per_class: int = 5) -> None:
    for label, name in enumerate(classes):
        (base / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            pixels = np.full((8, 8, 3), (29 * label + 5) % 256, dtype=np.uint8)
            pixels[..., 1] = k
            Image.fromarray(pixels).save(base / name / f"img_{k}.png")


def test_a_root_one_level_above_train_and_test_is_refused_naming_the_right_root(tmp_path: Path) -> None:
    data = tmp_path / "parent" / "flowers"
    for split in ("train", "test"):
        _class_folders(data / split, ["daisy", "rose", "tulip"])
    with pytest.raises(ValueError) as error:
        ClassIncrementalDataModule("image_folder", root=str(tmp_path / "parent"))
    message = str(error.value)
    assert "needs at least 2 classes" in message
    assert f"did you mean --data.root {data}" in message and "test, train" in message
    # The right root works: 3 classes from the pre-split folders.
    assert ClassIncrementalDataModule("image_folder", root=str(data), num_tasks=1).num_classes == 3


def test_a_single_class_is_refused(tmp_path: Path) -> None:
    _class_folders(tmp_path / "only", ["cat"])
    with pytest.raises(ValueError, match="found 1 class"):
        ClassIncrementalDataModule("image_folder", root=str(tmp_path / "only"))


def test_tasks_of_a_single_class_are_warned_about_with_the_num_tasks_that_fit(tmp_path: Path) -> None:
    _class_folders(tmp_path / "ten", [f"c{k}" for k in range(10)])
    with pytest.warns(UserWarning, match=r"10 of the 10 tasks have a single class.*--data.num_tasks 5 gives 2"):
        dm = ClassIncrementalDataModule("image_folder", root=str(tmp_path / "ten"), num_tasks=10)
    assert dm.num_tasks == 10  # a warning: a user may mean it (e.g. head_mask="seen")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ClassIncrementalDataModule("image_folder", root=str(tmp_path / "ten"), num_tasks=5)


def test_long_decoding_shows_progress(capsys: pytest.CaptureFixture[str]) -> None:
    """No silent stretch before the first epoch: decoding thousands of images shows a progress bar."""
    import io

    from ham_lightning.data.image_store import PROGRESS_MIN_IMAGES, decode_many

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(buffer, format="PNG")
    blobs = [buffer.getvalue()] * PROGRESS_MIN_IMAGES
    out = decode_many(blobs, [f"{k}.png" for k in range(len(blobs))], (4, 4))
    assert out.shape == (PROGRESS_MIN_IMAGES, 4, 4, 3)
    assert "decoding images" in capsys.readouterr().err
    decode_many(blobs[:10], [f"{k}.png" for k in range(10)], (4, 4))
    assert "decoding images" not in capsys.readouterr().err  # short passes stay quiet
