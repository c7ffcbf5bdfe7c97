"""Where a split's images live: decoded once into a uint8 array, or decoded per item from files.

Small images (digits, CIFAR-100, Tiny-ImageNet) are decoded once into an ``N x H x W x 3`` uint8 tensor held in
memory (optionally cached to ``.npy``), so an epoch costs only the transforms. Large images (ImageNet-R, CUB,
image folders) stay as file paths and are decoded with PIL by the loader workers.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ham_lightning.disk import cached_file

#: File name extensions read as images (torchvision's ``IMG_EXTENSIONS``), compared lower-case.
IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def decode_rgb(source: bytes | str | os.PathLike[str], name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one image to ``H x W x 3`` uint8 RGB (grey-scale and palette images are converted).

    ``size`` (width, height), when given, resizes images of another size so that they stack. A file that PIL
    cannot decode raises a `ValueError` naming ``name``.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            rgb = image.convert("RGB")
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"Corrupt or unreadable image: {name} ({type(err).__name__}: {err}). Replace or remove this file."
        ) from err
    if size is not None and rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    return np.array(rgb, dtype=np.uint8)


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's core count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def decode_many(blobs: Sequence[bytes], names: Sequence[str], size: tuple[int, int]) -> np.ndarray:
    """Decode encoded images into one ``N x H x W x 3`` uint8 array, on a thread per core (PIL frees the GIL)."""
    width, height = size
    out = np.empty((len(blobs), height, width, 3), dtype=np.uint8)

    def decode_range(bounds: tuple[int, int]) -> None:
        for i in range(*bounds):
            out[i] = decode_rgb(blobs[i], names[i], size)

    chunk = 512
    ranges = [(start, min(start + chunk, len(blobs))) for start in range(0, len(blobs), chunk)]
    with ThreadPoolExecutor(max_workers=usable_cpus()) as pool, _progress(len(blobs), "decoding images") as bar:
        for (start, stop), _ in zip(ranges, pool.map(decode_range, ranges)):  # re-raises the first error
            bar.update(stop - start)
    return out


#: Below this many images, decoding or verifying is quick enough to need no progress bar.
PROGRESS_MIN_IMAGES = 2000


def _progress(total: int, what: str) -> Any:
    """A tqdm bar on stderr for long decoding or verification passes (a no-op one for short ones), so a run
    never sits silent for minutes before its first epoch."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=what, unit="img", disable=total < PROGRESS_MIN_IMAGES, mininterval=2.0,
                leave=False)


def verify_image_files(paths: Sequence[str]) -> None:
    """Open every file and run PIL's ``verify`` (header, and chunk checksums for PNG), so a file that is not an
    image fails at setup, naming it, not mid-epoch. Every bad file of the list is named in one error. A JPEG
    truncated after a valid header passes here; decoding it later raises an error that names it too."""
    problems: list[str] = []
    with _progress(len(paths), "verifying image files") as bar:
        for path in paths:
            problem = _check_image(lambda p=path: p, path)
            if problem:
                problems.append(problem)
            bar.update(1)
    raise_bad_images(problems)


def _check_image(open_source: Callable[[], Any], name: str) -> str | None:
    """None if PIL verifies the image ``open_source()`` gives (a path or a file object), else what is wrong."""
    try:
        with Image.open(open_source()) as image:
            image.verify()
    except (FileNotFoundError, KeyError):
        return f"Image file listed but missing: {name}"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"Corrupt or unreadable image: {name} ({type(err).__name__}: {err})"
    return None


class BadImagesError(ValueError):
    """One or more images of a split cannot be read; the message lists every one of them."""


def raise_bad_images(problems: Sequence[str]) -> None:
    """Raise one `BadImagesError` naming every bad image (nothing if ``problems`` is empty)."""
    if not problems:
        return
    shown = "\n  ".join(problems[:50])
    more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
    raise BadImagesError(
        f"{len(problems)} bad image(s) in this split:\n  {shown}{more}\n"
        "Replace or remove these files (or set verify_images=False to find them only when they are read)."
    )


def fingerprint(parts: Iterable[str | bytes]) -> str:
    """A short stable hash of what a decoded array was built from (sources, labels, sizes)."""
    digest = hashlib.sha1()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def cached_array(cache_dir: str | os.PathLike[str] | None, name: str, build: Callable[[], np.ndarray]) -> np.ndarray:
    """``build()``, or its copy saved as ``cache_dir/name.npy`` by an earlier run.

    Built and written under a lock, through a temporary file and an atomic rename (`ham_lightning.disk`, as the
    prefix-activation cache), so concurrent runs decode a split once and a failed or interrupted decode never
    leaves a half-written cache behind.
    """
    if cache_dir is None:
        return build()

    def write(tmp: Path) -> np.ndarray:
        array = build()
        np.save(tmp, array, allow_pickle=False)
        return array

    return cached_file(Path(cache_dir).expanduser() / f"{name}.npy", lambda p: np.load(p, allow_pickle=False), write)


class ImageStore:
    """Random access to a split's images as uint8 ``3 x H x W`` tensors."""

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, index: int) -> torch.Tensor:
        raise NotImplementedError


class TensorImageStore(ImageStore):
    """Images decoded once, kept as one ``N x H x W x 3`` uint8 tensor (shared with fork-started workers)."""

    def __init__(self, images: np.ndarray | torch.Tensor) -> None:
        tensor = torch.as_tensor(images)
        if tensor.dtype != torch.uint8 or tensor.ndim != 4 or tensor.shape[-1] != 3:
            raise ValueError(f"expected an N x H x W x 3 uint8 array, got {tuple(tensor.shape)} {tensor.dtype}.")
        self.images = tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def get(self, index: int) -> torch.Tensor:
        return self.images[index].permute(2, 0, 1)


class FileImageStore(ImageStore):
    """Images decoded per item from files with PIL."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        return torch.from_numpy(decode_rgb(path, path)).permute(2, 0, 1)


class ZipImageStore(ImageStore):
    """Images decoded per item from members of one zip archive (opened lazily, once per process, so forked
    loader workers each hold their own handle)."""

    def __init__(self, archive: str | os.PathLike[str], members: Sequence[str]) -> None:
        self.archive = Path(archive)
        self.members = list(members)
        self._handle: tuple[int, zipfile.ZipFile] | None = None

    def __len__(self) -> int:
        return len(self.members)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None}

    def _zip(self) -> zipfile.ZipFile:
        if self._handle is None or self._handle[0] != os.getpid():
            self._handle = (os.getpid(), zipfile.ZipFile(self.archive))
        return self._handle[1]

    def describe(self, index: int) -> str:
        return f"{self.archive}:{self.members[index]}"

    def get(self, index: int) -> torch.Tensor:
        data = self._zip().read(self.members[index])
        return torch.from_numpy(decode_rgb(data, self.describe(index))).permute(2, 0, 1)

    def verify(self) -> None:
        """PIL's ``verify`` on every member; one `BadImagesError` names every bad one (archive:member)."""
        archive = self._zip()
        problems: list[str] = []
        with _progress(len(self.members), "verifying image files") as bar:
            for i, member in enumerate(self.members):
                problem = _check_image(lambda m=member: io.BytesIO(archive.read(m)), self.describe(i))
                if problem:
                    problems.append(problem)
                bar.update(1)
        raise_bad_images(problems)


class ConcatImageStore(ImageStore):
    """Several stores one after another (the sources of a mixed-domain scenario)."""

    def __init__(self, stores: Sequence[ImageStore]) -> None:
        self.stores = list(stores)
        self.offsets = np.cumsum([0] + [len(s) for s in self.stores])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.stores[part].get(index - int(self.offsets[part]))


class SubsetImageStore(ImageStore):
    """The items of ``store`` at ``positions``."""

    def __init__(self, store: ImageStore, positions: Sequence[int] | np.ndarray) -> None:
        self.store = store
        self.positions = np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def get(self, index: int) -> torch.Tensor:
        return self.store.get(int(self.positions[index]))
