"""The embedded default: scikit-learn's handwritten digits, so the quick start needs no download."""

from __future__ import annotations

import numpy as np

from .base import DatasetReader, Split, SplitData, seeded_split, seeded_split_name


class DigitsReader(DatasetReader):
    """``sklearn.datasets.load_digits``: 1,797 real 8x8 grey digits (UCI optdigits), 10 classes.

    Pixels (0..16) become uint8 RGB; train/test is a seeded per-class split (``test_fraction``, ``split_seed``).
    Images are upscaled to 32 px by default, trained with pad-crop and no flip (a flipped digit is another one).
    """

    name = "digits"
    layout = "built in (scikit-learn's load_digits ships inside the package); root is not used"
    needs_root = False
    default_image_size = 32
    default_num_tasks = 5
    default_crop_pct = 1.0
    train_crop = "pad"
    hflip = False

    def _scan(self) -> None:
        self._set_classes([str(d) for d in range(10)])
        self.split = seeded_split_name(self.options.test_fraction)
        self._data: tuple[np.ndarray, np.ndarray] | None = None

    def _all(self) -> tuple[np.ndarray, np.ndarray]:
        if self._data is None:
            from sklearn.datasets import load_digits

            digits = load_digits()
            grey = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            self._data = np.repeat(grey[..., None], 3, axis=-1), digits.target.astype(np.int64)
        return self._data

    def load(self, split: Split) -> SplitData:
        images, labels = self._all()
        train, test = seeded_split(labels, self.options.test_fraction, self.options.split_seed)
        positions = train if split == "train" else test
        positions = positions[self._select(split, labels[positions])]
        return SplitData(
            labels=labels[positions], names=[f"digits[{i}]" for i in positions], images=images[positions]
        )
