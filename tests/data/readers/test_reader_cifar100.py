"""CIFAR-100 from the ``cifar-100-python`` pickles, as torchvision's downloader leaves them."""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from ham_lightning.data import ClassIncrementalDataModule, ReadOptions, build_reader
from ham_lightning.data.readers import cifar100 as cifar_module


def test_reads_the_pickles_with_their_real_keys(tmp_path: Path, layouts) -> None:
    layouts.make_cifar100(tmp_path, train_per_class=3, test_per_class=2)  # Python-2 pickles, as the real files
    reader = build_reader("cifar100", tmp_path)
    assert reader.num_classes == 100 and reader.split == "official"
    assert reader.class_names == [f"class_{k:02d}" for k in range(100)]
    train, test = reader.load("train"), reader.load("test")
    assert len(train.labels) == 300 and len(test.labels) == 200
    assert train.images is not None and test.images is not None
    assert train.images.shape == (300, 32, 32, 3) and train.images.dtype == np.uint8
    assert sorted(set(train.labels.tolist())) == list(range(100))
    assert np.bincount(test.labels, minlength=100).tolist() == [2] * 100
    # Channel-major rows become H x W x 3 images: red is the class tone, green the image index, blue 7.
    for i in (0, 1, 150, 299):
        image = train.images[i]
        assert (image[..., 0] == layouts.tone(int(train.labels[i]))).all()
        assert (image[..., 1] == i % 256).all()
        assert (image[..., 2] == 7).all()


def test_root_may_be_the_pickle_folder_and_limits_apply(tmp_path: Path, layouts) -> None:
    layouts.make_cifar100(tmp_path, train_per_class=3, test_per_class=2)
    reader = build_reader("cifar100", tmp_path / "cifar-100-python",
                          ReadOptions(limit_per_class_train=2, limit_per_class_test=1))
    train = reader.load("train")
    assert len(train.labels) == 200
    assert np.bincount(train.labels).tolist() == [2] * 100
    # The first two of each class, in file order: positions 0..199 of the interleaved file.
    assert train.names[0].endswith("train[0]") and train.names[-1].endswith("train[199]")
    assert len(reader.load("test").labels) == 100


def test_missing_root_names_the_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar100: root .*nowhere does not exist\. Expected layout: "
                                                r"ROOT/cifar-100-python/\{train,test,meta\}"):
        build_reader("cifar100", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no cifar-100-python/meta under .*download=True.*Expected layout"):
        build_reader("cifar100", tmp_path)
    with pytest.raises(ValueError, match=r"needs root.*Expected layout: ROOT/cifar-100-python"):
        build_reader("cifar100", None)


def test_download_without_network_says_where_to_put_the_files(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def offline(url: str, download_root: str, filename: str, **kwargs) -> None:
        calls.append(url)  # torchvision creates the folder and starts writing the archive before failing
        Path(download_root).mkdir(parents=True, exist_ok=True)
        (Path(download_root) / filename).write_bytes(b"partial")
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar_module, "download_and_extract_archive", offline)
    root = tmp_path / "data"
    dm = ClassIncrementalDataModule("cifar100", root=str(root), download=True, num_tasks=10, image_size=32)
    assert dm.num_classes == 100 and dm.task_sizes == [10] * 10  # known before any file exists
    with pytest.raises(RuntimeError, match=r"could not download https://www\.cs\.toronto\.edu/~kriz/"
                                           r"cifar-100-python\.tar\.gz.*no network access.*Download "
                                           r"cifar-100-python\.tar\.gz elsewhere and extract it into .*data, so that "
                                           r".*data/cifar-100-python/ holds train, test and meta"):
        dm.prepare_data()
    assert len(calls) == 1
    assert not root.exists(), "a failed download must leave nothing behind"
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/train is missing.*prepare_data"):
        dm.setup("fit")
    assert not dm._splits


def test_download_is_skipped_when_the_files_are_there(tmp_path: Path, layouts, monkeypatch) -> None:
    layouts.make_cifar100(tmp_path, train_per_class=1, test_per_class=1)
    monkeypatch.setattr(cifar_module, "download_and_extract_archive",
                        lambda *a, **k: pytest.fail("must not download existing files"))
    reader = build_reader("cifar100", tmp_path, ReadOptions(download=True))
    reader.prepare()
    assert len(reader.load("train").labels) == 100


def test_malformed_pickles(tmp_path: Path, layouts) -> None:
    layouts.make_cifar100(tmp_path, train_per_class=1, test_per_class=1)
    folder = tmp_path / "cifar-100-python"
    (folder / "train").write_bytes(b"this is not a pickle")
    reader = build_reader("cifar100", tmp_path)
    with pytest.raises(ValueError, match=r"torchvision's CIFAR100 could not read the train split from .*"
                                         r"cifar-100-python \(files train and meta; UnpicklingError.*extract "
                                         r"cifar-100-python\.tar\.gz"):
        reader.load("train")
    with open(folder / "train", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "coarse_labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"could not read the train split .*KeyError: 'fine_labels'"):
        reader.load("train")
    with open(folder / "train", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 100]}, f)
    with pytest.raises(ValueError, match=r"fine_labels outside 0\.\.99"):
        reader.load("train")
    (folder / "meta").write_bytes(b"")
    with pytest.raises(ValueError, match=r"could not read the test split .*files test and meta; EOFError"):
        build_reader("cifar100", tmp_path)


def test_a_re_pickled_copy_with_bytes_keys_is_refused_clearly(tmp_path: Path, layouts) -> None:
    layouts.make_cifar100(tmp_path, train_per_class=1, test_per_class=1, py2=False)  # not the official pickles
    with pytest.raises(ValueError, match=r"could not read the test split .*KeyError: 'data'.*extract"):
        build_reader("cifar100", tmp_path)
