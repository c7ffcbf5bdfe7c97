"""What a resumed run may change: a resume whose settings contradict its checkpoint's is refused."""

from __future__ import annotations

from typing import Any

#: Settings a resumed run may change without changing its results (paths, workers, what is printed or logged).
RESUME_MAY_CHANGE = (
    "data.root", "data.num_workers", "data.pin_memory", "data.cache_dir", "data.verify_images", "data.download",
    "data.eval_batch_size", "merge.evaluate",
)
#: Trainer settings that change what a resumed run computes (the rest: devices, loggers, progress...).
RESUME_TRAINER_KEYS = (
    "max_epochs", "max_steps", "precision", "accumulate_grad_batches", "gradient_clip_val",
    "gradient_clip_algorithm", "limit_train_batches", "deterministic",
)



def contradictions(saved: dict[str, Any], given: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, saved, given)`` for every setting that changes what a run computes and differs between a
    checkpoint's config and a resume's (keys absent from either side are not compared)."""
    flat_saved, flat_given = _flatten(saved), _flatten(given)
    out = []
    for key in sorted(flat_saved.keys() & flat_given.keys()):
        top = key.split(".", 1)[0]
        relevant = (top in ("model", "data", "merge", "seed_everything")
                    or (top == "trainer" and key.split(".")[1] in RESUME_TRAINER_KEYS))
        if not relevant or key in RESUME_MAY_CHANGE or any(key.startswith(k + ".") for k in RESUME_MAY_CHANGE):
            continue
        if _normal(flat_saved[key]) != _normal(flat_given[key]):
            out.append((key, flat_saved[key], flat_given[key]))
    return out


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value} if prefix else {}


def _normal(value: Any) -> Any:
    """Values compared as JSON: tuples as lists, 3 == 3.0."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value

