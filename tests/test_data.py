"""edropout.experiments.data on small data sets written here in the real on-disk formats, read by torchvision's readers."""

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
import torchvision.datasets.flowers102
from PIL import Image

from edropout.experiments import data

FIXTURE = Path(__file__).resolve().parents[2] / "shared/fixtures/fashion-sample"
MEAN, STD = torch.tensor(data.MEAN)[:, None, None], torch.tensor(data.STD)[:, None, None]


def _randint(gen, high, *shape):
    return torch.randint(high, shape, generator=gen, dtype=torch.int64).numpy().astype(np.uint8)


def _gray(raw):
    """What an un-augmented gray item must be at its native size: ToTensor only."""
    return torch.from_numpy(np.asarray(raw, dtype=np.float32) / 255)[None]


def _colour(raw):
    """What an un-augmented colour item (HWC uint8) must be at its native size: ToTensor and Normalize."""
    return (torch.from_numpy(np.asarray(raw)).permute(2, 0, 1).float() / 255 - MEAN) / STD


def _labels(split):
    return [split.base[i][1] for i in split.indices]


def _check_partition(splits, n_train_file):
    train, val = set(splits.train.indices), set(splits.val.indices)
    assert not train & val and train | val == set(range(n_train_file))


def _write_idx(path, array, compress):
    """An IDX file (ubyte): magic 0x0800 + ndim, big-endian dims, the bytes."""
    payload = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _write_mnist(root, folder, gen, n_train, n_test, compress):
    raw = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        raw[prefix] = _randint(gen, 256, n, 28, 28), _randint(gen, 10, n)
        _write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", raw[prefix][0], compress)
        _write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", raw[prefix][1], compress)
    return raw


def _write_cifar(root, gen, cifar100):
    """cifar-10-batches-py (5 batches of 8, test 10) or cifar-100-python (train 30, test 10) as pickles."""
    folder = root / ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    files = {"train": 30, "test": 10} if cifar100 else {**{f"data_batch_{i}": 8 for i in range(1, 6)}, "test_batch": 10}
    written = {}
    for file, n in files.items():
        images, labels = _randint(gen, 256, n, 3 * 32 * 32), _randint(gen, 100 if cifar100 else 10, n).tolist()
        entry = {"data": images, "fine_labels": labels, "coarse_labels": [y // 5 for y in labels]} if cifar100 \
            else {"batch_label": file, "data": images, "labels": labels}
        (folder / file).write_bytes(pickle.dumps(entry))
        written[file] = images.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1), labels
    meta = {"fine_label_names": [f"c{i}" for i in range(100)]} if cifar100 \
        else {"label_names": [f"c{i}" for i in range(10)]}
    (folder / ("meta" if cifar100 else "batches.meta")).write_bytes(pickle.dumps(meta))
    return written


@pytest.fixture
def no_md5(monkeypatch):
    """Test files have other checksums than the real ones: let torchvision check only that files exist."""
    def exists(fpath, md5=None):
        return os.path.isfile(fpath)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", exists)
    monkeypatch.setattr(torchvision.datasets.flowers102, "check_integrity", exists)


# ---------------------------------------------------------------------------------------------- fashion, kuzushiji

def test_fashion_from_gzip_archives(tmp_path, gen):
    raw = _write_mnist(tmp_path, "FashionMNIST", gen, 40, 10, compress=True)
    s = data.load("fashion", tmp_path, 32)
    assert (len(s.train), len(s.val), len(s.test)) == (36, 4, 10)          # 10% validation, as 54k / 6k of 60k
    assert (s.num_classes, s.in_channels) == (10, 1)
    assert (tmp_path / "FashionMNIST/raw/train-images-idx3-ubyte").is_file()   # extracted as the downloader does
    _check_partition(s, 40)
    for split in (s.train, s.val, s.test):
        x, y = split[0]
        assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
        assert 0 <= x.min() and x.max() <= 1
    torch.testing.assert_close(s.train[0][0], s.train[0][0])              # no augmentation by default
    # at the native size the items are exactly the stored pixels / 255, with their labels
    s = data.load("fashion", tmp_path, 28)
    for split, (images, labels), idx in ((s.val, raw["train"], s.val.indices), (s.test, raw["t10k"], range(10))):
        for i, j in enumerate(idx):
            x, y = split[i]
            torch.testing.assert_close(x, _gray(images[j]), rtol=0, atol=0)
            assert y == labels[j]


@pytest.fixture
def system_fashion(tmp_path, monkeypatch):
    """An empty stand-in for the folder of Debian's dataset-fashion-mnist package."""
    folder = tmp_path / "system" / "fashion-mnist"
    monkeypatch.setattr(data, "SYSTEM_FASHION", folder)
    return folder


def test_fashion_from_the_system_folder(tmp_path, gen, system_fashion):
    # the Debian package's layout: the four gzipped IDX files in one folder, read in place
    raw = _write_mnist(system_fashion.parent, system_fashion.name, gen, 40, 10, compress=True)
    for path in (system_fashion / "raw").iterdir():
        path.rename(system_fashion / path.name)
    (system_fashion / "raw").rmdir()
    system_fashion.chmod(0o555)
    try:
        before = sorted(p.name for p in system_fashion.iterdir())
        s = data.load("fashion", tmp_path / "empty", 28)
        assert sorted(p.name for p in system_fashion.iterdir()) == before     # nothing written there
    finally:
        system_fashion.chmod(0o755)
    assert not (tmp_path / "empty").exists()
    assert (len(s.train), len(s.val), len(s.test)) == (36, 4, 10) and (s.num_classes, s.in_channels) == (10, 1)
    _check_partition(s, 40)
    for split, (images, labels), idx in ((s.val, raw["train"], s.val.indices), (s.test, raw["t10k"], range(10))):
        for i, j in enumerate(idx):
            x, y = split[i]
            torch.testing.assert_close(x, _gray(images[j]), rtol=0, atol=0)
            assert y == labels[j]
    # data in --data-root (torchvision's layout) comes first
    other = _write_mnist(tmp_path / "root", "FashionMNIST", gen, 20, 10, compress=False)
    s = data.load("fashion", tmp_path / "root", 28)
    assert len(s.train) + len(s.val) == 20 and _labels(s.test) == other["t10k"][1].tolist()


def test_fashion_nowhere_names_both_remedies(tmp_path, system_fashion):
    with pytest.raises(FileNotFoundError) as info:
        data.load("fashion", tmp_path, 32)
    assert str(info.value) == (f"fashion: no data at {tmp_path / 'FashionMNIST/raw'} nor at {system_fashion}; pass "
                               f"--download to fetch it (needs network) or install it with apt-get install "
                               f"dataset-fashion-mnist")


@pytest.mark.parametrize("damage, message", [(lambda b: b[:-3], "bytes of data"),
                                             (lambda b: b"\x00\x00\x0d\x03" + b[4:], "unsigned bytes"),
                                             (lambda b: b[:6], "truncated"),
                                             (None, "gzip")])
def test_damaged_idx_file_is_one_line(tmp_path, gen, system_fashion, damage, message):
    _write_mnist(system_fashion.parent, system_fashion.name, gen, 8, 4, compress=True)
    for path in (system_fashion / "raw").iterdir():
        path.rename(system_fashion / path.name)
    target = system_fashion / "t10k-images-idx3-ubyte.gz"
    if damage is None:
        target.write_bytes(b"not gzip")
    else:
        with gzip.open(target, "rb") as f:
            payload = f.read()
        with gzip.open(target, "wb") as f:
            f.write(damage(payload))
    with pytest.raises(ValueError) as info:
        data.load("fashion", tmp_path / "empty", 28)
    assert str(info.value).startswith(f"{target}: ") and message in str(info.value)
    assert len(str(info.value).splitlines()) == 1


REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (REAL_FASHION / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="needs Debian's dataset-fashion-mnist")
def test_real_fashion_from_the_system_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_FASHION", REAL_FASHION)
    s = data.load("fashion", tmp_path, 32)
    assert (len(s.train), len(s.val), len(s.test)) == (54000, 6000, 10000)
    assert s.test.base.targets.bincount().tolist() == [1000] * 10
    assert s.test.base.classes[0] == "T-shirt/top"


def test_kuzushiji_from_extracted_files(tmp_path, gen):
    raw = _write_mnist(tmp_path, "KMNIST", gen, 30, 10, compress=False)
    s = data.load("kuzushiji", tmp_path, 32, seed=3)
    assert (len(s.train), len(s.val), len(s.test)) == (27, 3, 10)
    assert (s.num_classes, s.in_channels) == (10, 1)
    _check_partition(s, 30)
    assert _labels(s.test) == raw["t10k"][1].tolist()
    x, _ = s.val[1]
    assert x.shape == (1, 32, 32) and 0 <= x.min() and x.max() <= 1


def test_validation_split_is_fixed_by_seed(tmp_path, gen):
    _write_mnist(tmp_path, "FashionMNIST", gen, 40, 10, compress=False)
    a, b, c = (data.load("fashion", tmp_path, 32, seed=seed) for seed in (0, 0, 1))
    assert a.val.indices == b.val.indices and a.train.indices == b.train.indices
    assert a.val.indices != c.val.indices
    assert a.test.indices == c.test.indices == list(range(10))


def test_augmentation_only_on_the_training_split(tmp_path, gen):
    raw = _write_mnist(tmp_path, "FashionMNIST", gen, 40, 10, compress=False)
    s = data.load("fashion", tmp_path, 28, augment=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        assert not torch.equal(s.train[0][0], s.train[0][0])
        for split, images, idx in ((s.val, raw["train"][0], s.val.indices), (s.test, raw["t10k"][0], range(10))):
            for i, j in enumerate(idx):
                torch.testing.assert_close(split[i][0], _gray(images[j]), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- cifar

def test_cifar10(tmp_path, gen, no_md5):
    written = _write_cifar(tmp_path, gen, cifar100=False)
    train_images = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    s = data.load("cifar10", tmp_path, 32)
    assert (len(s.train), len(s.val), len(s.test)) == (36, 4, 10)            # 10% validation, as 45k / 5k of 50k
    assert (s.num_classes, s.in_channels) == (10, 3)
    _check_partition(s, 40)
    assert _labels(s.test) == written["test_batch"][1]
    # validation and test: normalised with the ImageNet mean and std, never augmented
    for i, j in enumerate(s.val.indices):
        torch.testing.assert_close(s.val[i][0], _colour(train_images[j]))
    for i in range(10):
        torch.testing.assert_close(s.test[i][0], _colour(written["test_batch"][0][i]))
    # training: augmented by default (flip, rotation, cutout), so two draws differ; off on request
    with torch.random.fork_rng():
        torch.manual_seed(0)
        x = s.train[0][0]
        assert x.shape == (3, 32, 32) and not torch.equal(x, s.train[0][0])
    plain = data.load("cifar10", tmp_path, 32, augment=False)
    torch.testing.assert_close(plain.train[0][0], _colour(train_images[plain.train.indices[0]]))


def test_cifar100_resized_for_alexnet(tmp_path, gen, no_md5):
    written = _write_cifar(tmp_path, gen, cifar100=True)
    s = data.load("cifar100", tmp_path, 224, seed=5)
    assert (len(s.train), len(s.val), len(s.test)) == (27, 3, 10)
    assert (s.num_classes, s.in_channels) == (100, 3)
    assert _labels(s.test) == written["test"][1]                            # the fine labels
    assert s.val[0][0].shape == s.train[0][0].shape == (3, 224, 224)


def test_cifar_checksums_still_checked(tmp_path, gen):
    _write_cifar(tmp_path, gen, cifar100=False)
    with pytest.raises(FileNotFoundError, match=r"^cifar10: incomplete or corrupted data at .*cifar-10-batches-py; "
                                                r"pass --download"):
        data.load("cifar10", tmp_path, 32)


# ---------------------------------------------------------------------------------------------- flowers

def test_flowers_pooled_and_split_per_class(tmp_path, gen, no_md5):
    scipy_io = pytest.importorskip("scipy.io")
    folder = tmp_path / "flowers-102"
    (folder / "jpg").mkdir(parents=True)
    classes, per_class = (1, 50, 102), 22                                   # 1-based, as in imagelabels.mat
    labels = np.repeat(classes, per_class)
    for image_id in range(1, len(labels) + 1):
        h, w = 20 + image_id % 7, 16 + image_id % 5                         # sizes vary, as the real ones do
        Image.fromarray(_randint(gen, 256, h, w, 3)).save(folder / "jpg" / f"image_{image_id:05d}.jpg")
    ids = torch.randperm(len(labels), generator=gen).numpy() + 1            # torchvision's splits, at random
    scipy_io.savemat(folder / "imagelabels.mat", {"labels": labels[None]})
    scipy_io.savemat(folder / "setid.mat", {"trnid": ids[None, :20], "valid": ids[None, 20:40],
                                            "tstid": ids[None, 40:]})
    s = data.load("flowers", tmp_path, 16)
    assert (len(s.train), len(s.val), len(s.test)) == (6, 30, 30)          # per class: 2 / 10 / 10
    assert (s.num_classes, s.in_channels) == (102, 3)
    for split, n in ((s.train, 2), (s.val, 10), (s.test, 10)):
        assert sorted(_labels(split)) == sorted(np.repeat([c - 1 for c in classes], n).tolist())
    assert len(set(s.train.indices) | set(s.val.indices) | set(s.test.indices)) == 66   # disjoint, all pooled
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    for split in (s.val, s.test):
        x, _ = split[0]
        assert x.shape == (3, 16, 16) and (x >= lo - 1e-6).all() and (x <= hi + 1e-6).all()
        torch.testing.assert_close(x, split[0][0], rtol=0, atol=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        assert not torch.equal(s.train[0][0], s.train[0][0])                 # augmented by default
    again, other = data.load("flowers", tmp_path, 16), data.load("flowers", tmp_path, 16, seed=1)
    assert again.val.indices == s.val.indices and other.val.indices != s.val.indices
    assert other.test.indices == s.test.indices                               # the test set never moves


# ---------------------------------------------------------------------------------------------- imagefolder

def test_imagefolder_colour(tmp_path, gen):
    pixels = {}
    for split, n in (("train", 10), ("test", 2)):
        for c in ("cat", "dog", "emu"):
            (tmp_path / split / c).mkdir(parents=True)
            for k in range(n):
                pixels[split, c, k] = _randint(gen, 256, 12, 12, 3)
                Image.fromarray(pixels[split, c, k]).save(tmp_path / split / c / f"{k}.png")
    s = data.load("imagefolder", tmp_path, 12)
    assert (len(s.train), len(s.val), len(s.test)) == (27, 3, 6)
    assert (s.num_classes, s.in_channels) == (3, 3)
    _check_partition(s, 30)
    for i in range(6):
        x, y = s.test[i]
        c, k = ("cat", "dog", "emu")[y], i % 2
        torch.testing.assert_close(x, _colour(pixels["test", c, k]))
    torch.testing.assert_close(s.train[0][0], s.train[0][0], rtol=0, atol=0)   # not augmented by default


@pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"no fixture at {FIXTURE}")
def test_imagefolder_real_fashion_sample():
    s = data.load("imagefolder", FIXTURE, 28)
    assert (len(s.train), len(s.val), len(s.test)) == (18, 2, 20)
    assert (s.num_classes, s.in_channels) == (10, 1)
    for i, (path, label) in enumerate(s.test.base.samples):
        x, y = s.test[i]
        torch.testing.assert_close(x, _gray(Image.open(path)), rtol=0, atol=0)
        assert y == label == int(Path(path).parent.name)
    x, _ = data.load("imagefolder", FIXTURE, 32).val[0]
    assert x.shape == (1, 32, 32) and 0 <= x.min() and x.max() <= 1 and x.max() > 0


# ---------------------------------------------------------------------------------------------- digits

def test_digits():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    s = data.load("digits", "unused", 8)
    assert (len(s.train), len(s.val), len(s.test)) == (1258, 180, 359)
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    assert (s.num_classes, s.in_channels) == (10, 1)
    assert len(set(s.train.indices) | set(s.val.indices) | set(s.test.indices)) == 1797
    assert set(_labels(s.val)) == set(_labels(s.test)) == set(range(10))   # stratified
    digits = load_digits()
    j = s.test.indices[0]
    torch.testing.assert_close(s.test[0][0], _gray(np.round(digits.images[j] * 255 / 16)), rtol=0, atol=0)
    assert s.test[0][1] == digits.target[j]
    other = data.load("digits", "unused", 32, seed=1)
    assert other.test.indices == s.test.indices and other.val.indices != s.val.indices
    x, _ = other.train[0]
    assert x.shape == (1, 32, 32) and 0 <= x.min() and x.max() <= 1


# ---------------------------------------------------------------------------------------------- errors, cutout

@pytest.mark.parametrize("name, path", [("fashion", "FashionMNIST/raw"), ("kuzushiji", "KMNIST/raw"),
                                        ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                                        ("flowers", "flowers-102")])
def test_missing_files(tmp_path, name, path, system_fashion):
    with pytest.raises(FileNotFoundError) as info:
        data.load(name, tmp_path, 32)
    message = str(info.value)
    if name == "fashion":  # and not in the system's folder either (test_fashion_nowhere_names_both_remedies)
        assert message.startswith(f"{name}: no data at {tmp_path / path} nor at {system_fashion}; pass --download")
    else:
        assert message == f"{name}: no data at {tmp_path / path}; pass --download to fetch it (needs network)"


def test_missing_imagefolder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"^imagefolder: no data at {tmp_path / 'train'}; expected"):
        data.load("imagefolder", tmp_path, 32)


@pytest.mark.parametrize("kwargs, argument", [({"name": "mnist"}, "name"),
                                              ({"model_input_size": 0}, "model_input_size"),
                                              ({"model_input_size": 32.0}, "model_input_size"),
                                              ({"model_input_size": True}, "model_input_size")])
def test_bad_arguments(tmp_path, kwargs, argument):
    args = {"name": "digits", "root": tmp_path, "model_input_size": 32, **kwargs}
    with pytest.raises(ValueError, match=f"^{argument} must be"):
        data.load(**args)


def test_cutout_zeroes_one_clipped_square():
    cutout = data.Cutout(8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for _ in range(50):
            x = torch.ones(3, 32, 32)
            zero = cutout(x) == 0
            assert x.eq(1).all()                                              # the input is left alone
            assert (zero == zero[:1]).all()                                   # the same square in every channel
            rows, cols = zero[0].any(1).nonzero().flatten(), zero[0].any(0).nonzero().flatten()
            assert 4 <= len(rows) <= 8 and 4 <= len(cols) <= 8
            assert zero[0].sum() == len(rows) * len(cols)                     # a rectangle: the clipped square
            assert rows.diff().eq(1).all() and cols.diff().eq(1).all()
