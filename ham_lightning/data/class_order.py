"""Class orders: which original class becomes global class 0, 1, ... of a scenario."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: The seed of PyCIL / LAMDA-PILOT / EASE / RanPAC configs.
DEFAULT_SEED = 1993


def seed_class_order(num_classes: int, seed: int = DEFAULT_SEED) -> list[int]:
    """``np.random.seed(seed); np.random.permutation(num_classes)``, exactly as PyCIL does it.

    It must be NumPy's legacy global generator (not ``default_rng``) to reproduce the published orders; the
    caller's global NumPy state is restored afterwards so that building a scenario never disturbs it.
    """
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return [int(c) for c in np.random.permutation(num_classes)]
    finally:
        np.random.set_state(state)


def resolve_class_order(class_order: str | Sequence[int], num_classes: int, seed: int = DEFAULT_SEED) -> list[int]:
    """Turn ``"seed"``, ``"natural"`` or an explicit list into a permutation of ``0..num_classes-1``.

    Entry ``k`` of the result is the original class that becomes global class ``k``.
    """
    if isinstance(class_order, str):
        if class_order == "seed":
            return seed_class_order(num_classes, seed)
        if class_order == "natural":
            return list(range(num_classes))
        raise ValueError(
            f"class_order must be 'seed', 'natural' or a list of class indices, got {class_order!r}."
        )
    order = list(class_order)
    if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in order):
        raise ValueError(f"class_order must contain integers only, got {order!r}.")
    order = [int(c) for c in order]
    if sorted(order) != list(range(num_classes)):
        missing = sorted(set(range(num_classes)) - set(order))
        extra = sorted({c for c in order if not 0 <= c < num_classes})
        duplicated = sorted({c for c in order if order.count(c) > 1})
        details = []
        if len(order) != num_classes:
            details.append(f"it has {len(order)} entries for {num_classes} classes")
        if missing:
            details.append(f"missing {_abbrev(missing)}")
        if extra:
            details.append(f"out of range {_abbrev(extra)}")
        if duplicated:
            details.append(f"duplicated {_abbrev(duplicated)}")
        raise ValueError(
            f"class_order is not a permutation of 0..{num_classes - 1}: " + "; ".join(details) + ". "
            "Give every class index exactly once, or use class_order='seed' or 'natural'."
        )
    return order


def _abbrev(values: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"
