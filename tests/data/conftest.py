"""Builders of small data sets in the real on-disk layouts (CIFAR-100 pickles, ImageNet-R, CUB-200-2011,
Tiny-ImageNet as a folder and as a zip, class-per-folder trees), written into ``tmp_path`` by the tests.

Every image encodes where it came from: its red channel is ``tone(class)``, so a test can check that a label
travels with its own pixels. The builders are exposed through the ``layouts`` fixture (a conftest's functions
cannot be imported by test modules portably).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """These tests move tiny tensors: one intra-op thread is faster on a shared machine (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tone(label: int) -> int:
    """The red value of every pixel of a class's images (distinct for 256 classes, 29 apart for the first 8)."""
    return (29 * label + 5) % 256


def pixels(label: int, index: int, size: tuple[int, int] = (8, 8)) -> np.ndarray:
    """``H x W x 3`` uint8: red is ``tone(label)`` everywhere, green a horizontal ramp offset by ``index``, blue a
    vertical ramp. Smooth, so JPEG keeps the red channel within a few levels."""
    width, height = size
    out = np.empty((height, width, 3), dtype=np.uint8)
    out[..., 0] = tone(label)
    out[..., 1] = (np.linspace(0, 120, width)[None, :] + (37 * index) % 120).astype(np.uint8)
    out[..., 2] = np.linspace(10, 200, height)[:, None].astype(np.uint8)
    return out


def _encode(label: int, index: int, size: tuple[int, int], mode: str, fmt: str) -> bytes:
    image = Image.fromarray(pixels(label, index, size))
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 98, "subsampling": 0} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_image(path: Path, label: int, index: int, size: tuple[int, int] = (8, 8), mode: str = "RGB") -> Path:
    """`pixels` saved as PNG (``.png``) or JPEG (any other suffix) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_encode(label, index, size, mode, "PNG" if path.suffix.lower() == ".png" else "JPEG"))
    return path


def image_bytes(label: int, index: int, size: tuple[int, int] = (64, 64), mode: str = "RGB") -> bytes:
    """`pixels` as JPEG bytes, for writing into a zip."""
    return _encode(label, index, size, mode, "JPEG")


# ---- CIFAR-100 ---------------------------------------------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes ``bytes`` as Python 2 ``str`` opcodes (BINSTRING), as the real ``cifar-100-python`` pickles were
    written: loading them with ``encoding="latin1"`` yields ``str`` keys, with ``encoding="bytes"`` bytes keys."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + len(obj).to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _dump(obj: Any, path: Path, py2: bool) -> None:
    with open(path, "wb") as f:
        if py2:
            _Py2Pickler(f, protocol=2).dump(obj)
        else:
            pickle.dump(obj, f)


def cifar_pixels(labels: Sequence[int], start: int = 0) -> np.ndarray:
    """``N x 3072`` channel-major rows: red plane ``tone(label)``, green plane the image index, blue 7."""
    data = np.empty((len(labels), 3, 32 * 32), dtype=np.uint8)
    for i, label in enumerate(labels):
        data[i, 0] = tone(label)
        data[i, 1] = (start + i) % 256
        data[i, 2] = 7
    return data.reshape(len(labels), 3072)


def make_cifar100(root: Path, train_per_class: int = 2, test_per_class: int = 1, py2: bool = True,
                  num_classes: int = 100) -> Path:
    """``root/cifar-100-python/{train,test,meta}`` with the real keys; images interleave classes as the real
    files do. ``py2=False`` writes what ``pickle.dump`` of a bytes-keyed dict gives (a re-pickled copy)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine_names = [f"class_{k:02d}" for k in range(num_classes)]
    meta = {b"fine_label_names": [n.encode() for n in fine_names],
            b"coarse_label_names": [f"super_{k}".encode() for k in range(20)]}
    _dump(meta, folder / "meta", py2)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = [k for _ in range(per_class) for k in range(num_classes)]
        entry = {
            b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
            b"batch_label": f"{split} batch 1 of 1".encode(),
            b"fine_labels": labels,
            b"coarse_labels": [k % 20 for k in labels],
            b"data": cifar_pixels(labels),
        }
        _dump(entry, folder / split, py2)
    return root


# ---- class-per-folder trees ----------------------------------------------------------------------------------


def make_class_folders(base: Path, classes: Sequence[str], per_class: int | Sequence[int], suffix: str = ".jpg",
                       size: tuple[int, int] = (8, 8)) -> list[Path]:
    """``base/<class>/img_<k><suffix>``; class ``i`` of ``classes`` gets ``tone(i)``."""
    counts = [per_class] * len(classes) if isinstance(per_class, int) else list(per_class)
    written = []
    for label, (name, count) in enumerate(zip(classes, counts)):
        for k in range(count):
            written.append(write_image(base / name / f"img_{k}{suffix}", label, k, size))
    return written


WNIDS = ["n01443537", "n01629819", "n01641577", "n01644900", "n01698640", "n01742172"]


# ---- CUB-200-2011 ------------------------------------------------------------------------------------------------


CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross",
               "004.Groove_billed_Ani"]


def make_cub(root: Path, per_class: int = 4, classes: Sequence[str] = CUB_CLASSES, with_classes_txt: bool = True
             ) -> Path:
    """``root/CUB_200_2011`` with the official text files; per class, the first half of images is train
    (``is_training_image = 1``), interleaved across classes by image id as in the real files."""
    folder = root / "CUB_200_2011"
    lines_images, lines_labels, lines_split = [], [], []
    image_id = 0
    for label, name in enumerate(classes):
        species = name.split(".", 1)[1]
        for k in range(per_class):
            image_id += 1
            rel = f"{name}/{species}_{k:04d}_{image_id}.jpg"
            write_image(folder / "images" / rel, label, k)
            lines_images.append(f"{image_id} {rel}")
            lines_labels.append(f"{image_id} {label + 1}")
            lines_split.append(f"{image_id} {1 if k < per_class // 2 else 0}")
    (folder / "images.txt").write_text("\n".join(lines_images) + "\n")
    (folder / "image_class_labels.txt").write_text("\n".join(lines_labels) + "\n")
    (folder / "train_test_split.txt").write_text("\n".join(lines_split) + "\n")
    if with_classes_txt:
        (folder / "classes.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(classes)))
    return folder


# ---- Tiny-ImageNet -----------------------------------------------------------------------------------------------


def tiny_members(wnids: Sequence[str] = WNIDS[:4], train_per_class: int = 3, val_per_class: int = 2,
                 grey: bool = True) -> dict[str, bytes]:
    """Files of ``tiny-imagenet-200/`` (relative path -> bytes) in the official layout. ``wnids.txt`` is not
    sorted (as in the real file) and val images interleave classes; with ``grey`` one train image is "L" mode."""
    files: dict[str, bytes] = {}
    listed = list(wnids)[::-1]  # the real wnids.txt is not in sorted order
    files["wnids.txt"] = "".join(f"{w}\n" for w in listed).encode()
    files["words.txt"] = "".join(f"{w}\tthing {w}\n" for w in listed).encode()
    sorted_ids = sorted(wnids)
    for label, wnid in enumerate(sorted_ids):
        boxes = []
        for k in range(train_per_class):
            mode = "L" if grey and label == 1 and k == 0 else "RGB"
            files[f"train/{wnid}/images/{wnid}_{k}.JPEG"] = image_bytes(label, k, mode=mode)
            boxes.append(f"{wnid}_{k}.JPEG\t0\t0\t63\t63\n")
        files[f"train/{wnid}/{wnid}_boxes.txt"] = "".join(boxes).encode()
    annotations = []
    index = 0
    for k in range(val_per_class):
        for label, wnid in enumerate(sorted_ids):
            files[f"val/images/val_{index}.JPEG"] = image_bytes(label, 100 + k)
            annotations.append(f"val_{index}.JPEG\t{wnid}\t1\t2\t60\t61\n")
            index += 1
    files["val/val_annotations.txt"] = "".join(annotations).encode()
    return files


def write_tiny_folder(root: Path, files: dict[str, bytes]) -> Path:
    """``root/tiny-imagenet-200/...``; returns the ``tiny-imagenet-200`` folder."""
    top = root / "tiny-imagenet-200"
    for rel, data in files.items():
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_bytes(data)
    return top


def write_tiny_zip(path: Path, files: dict[str, bytes]) -> Path:
    """``tiny-imagenet-200.zip`` with directory entries and a ``tiny-imagenet-200/`` prefix, as distributed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dirs = sorted({"/".join(rel.split("/")[:i]) for rel in files for i in range(1, rel.count("/") + 1)})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("tiny-imagenet-200/", b"")
        for d in dirs:
            archive.writestr(f"tiny-imagenet-200/{d}/", b"")
        for rel, data in files.items():
            archive.writestr(f"tiny-imagenet-200/{rel}", data)
    return path


class Layouts:
    """The builders above, handed to tests by the ``layouts`` fixture."""

    tone = staticmethod(tone)
    pixels = staticmethod(pixels)
    write_image = staticmethod(write_image)
    image_bytes = staticmethod(image_bytes)
    cifar_pixels = staticmethod(cifar_pixels)
    make_cifar100 = staticmethod(make_cifar100)
    make_class_folders = staticmethod(make_class_folders)
    make_cub = staticmethod(make_cub)
    tiny_members = staticmethod(tiny_members)
    write_tiny_folder = staticmethod(write_tiny_folder)
    write_tiny_zip = staticmethod(write_tiny_zip)
    WNIDS = WNIDS
    CUB_CLASSES = CUB_CLASSES


@pytest.fixture
def layouts() -> type[Layouts]:
    return Layouts


def class_of(image: torch.Tensor | np.ndarray, num_classes: int = 256) -> int:
    """The class whose tone the red channel of a uint8 ``3 x H x W`` image carries (uniform up to JPEG noise)."""
    red = torch.as_tensor(np.asarray(image[0])).to(torch.int32)
    assert int(red.max() - red.min()) <= 8, "the red channel of a fixture image should be uniform"
    mean = float(red.float().mean())
    return min(range(num_classes), key=lambda k: abs(tone(k) - mean))


@pytest.fixture
def class_of_image() -> Any:
    return class_of
