"""The data sets of the EDropout experiments, read with torchvision's dataset classes.

``load(name, root, model_input_size)`` gives a ``Splits`` of train / validation / test datasets, each
yielding ``(image, label)`` with ``image`` a float tensor ``[C, H, W]`` of side ``model_input_size``
(32 for the ResNets, 224 for AlexNet and SqueezeNet) and ``label`` an int.

    name         data under ``root``                      splits
    fashion      FashionMNIST/raw (torchvision), else the train 60k -> 54k train + 6k validation; test 10k
                 system's copy (below)
    kuzushiji    KMNIST/raw (torchvision)                 train 60k -> 54k train + 6k validation; test 10k
    cifar10      cifar-10-batches-py (torchvision)        train 50k -> 45k train + 5k validation; test 10k
    cifar100     cifar-100-python (torchvision)           train 50k -> 45k train + 5k validation; test 10k
    flowers      flowers-102 (torchvision Flowers102)     its train, val and test pooled (8189 images), then
                                                          per class 10 test, 10 validation, the rest train
    imagefolder  train/<class>/*.png, test/<class>/*.png  train/ -> 90% train + 10% validation; test/
    digits       none: scikit-learn's bundled 8x8 digits  1797 images, stratified: 1258 train, 180
                                                          validation (10%), 359 test (20%)

Validation is drawn at random (``len(train) // 10`` images) from the training data with ``seed``, so it is
the same on every run with the same seed. Where the test set is drawn too (flowers, per class; digits,
stratified), it is drawn with the fixed seed ``TEST_SEED`` whatever ``seed`` is, so every run is scored on
the same test images, and validation is then drawn from the rest with ``seed``.

Fashion-MNIST is looked for first in ``root`` (torchvision's layout; ``download=True`` fetches it there),
then in the folder where Debian's package ``dataset-fashion-mnist`` installs the four original gzipped IDX
files (``SYSTEM_FASHION``: ``$EDROPOUT_SYSTEM_DATA/fashion-mnist``, by default
``/usr/share/datasets/fashion-mnist``), read there as they are: nothing is written into a system folder.

Gray images are scaled to [0, 1] (``ToTensor`` only); colour images are normalised with the ImageNet mean
and std. Training sets of cifar10, cifar100 and flowers are augmented by default (``augment=None``):
random horizontal flip, random rotation by 0 to 180 degrees, then (after normalisation) ``Cutout`` of one
square of side ``model_input_size // 4``. Validation and test images are never augmented: every split is a
view of one un-transformed dataset with its own transform.
"""

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset
from torchvision import datasets, transforms
from torchvision.datasets.folder import default_loader
from torchvision.datasets.utils import extract_archive

from ..distributed import first_line

DATASETS = ("fashion", "kuzushiji", "cifar10", "cifar100", "flowers", "imagefolder", "digits")
AUGMENTED = ("cifar10", "cifar100", "flowers")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VAL_FRACTION = 0.1                  # validation: this fraction of the training data, drawn with `seed`
FLOWERS_PER_CLASS = 10              # flowers: validation and test images per class
DIGITS_TEST_FRACTION = 0.2          # digits: stratified test fraction (validation: VAL_FRACTION of all)
TEST_SEED = 0                       # the draw of the test set where there is one (flowers, digits)
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
# Where Debian's dataset packages install (apt-get install dataset-fashion-mnist)
SYSTEM_FASHION = Path(os.environ.get("EDROPOUT_SYSTEM_DATA", "/usr/share/datasets")) / "fashion-mnist"


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    fingerprint: Optional[dict] = None  # of the data's file list (:func:`fingerprint`), recorded in config.json


class UnreadableImage(ValueError):
    """An image file that PIL cannot read; the message is one line naming the file and why."""

    def __init__(self, message: str):
        # a DataLoader worker's error arrives as "Caught UnreadableImage in DataLoader worker process 0.\n
        # Original Traceback ...", the class's one line last: keep that line
        if message.startswith("Caught ") and "Traceback" in message:
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


def _unreadable(path, error: BaseException) -> UnreadableImage:
    if type(error).__name__ == "UnidentifiedImageError":  # its text ends in a file object's repr
        reason = "cannot identify image file"
    else:
        reason = getattr(error, "strerror", None) or first_line(error)
    return UnreadableImage(f"cannot read image {path}: {reason}; replace or remove it, then rerun or --resume")


# What PIL raises for a file that is not a readable image (a truncated one: OSError when decoded)
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageReader:
    """``read(path)`` with a file PIL cannot read raised as UnreadableImage naming it (a top-level class:
    DataLoader workers pickle it)."""

    def __init__(self, read):
        self.read = read

    def __call__(self, path):
        try:
            return self.read(path)
        except _IMAGE_ERRORS as e:
            raise _unreadable(path, e) from None


class View(Dataset):
    """The items ``indices`` of ``base`` (a dataset of (PIL image, label)), through ``transform``."""

    def __init__(self, base, indices, transform):
        self.base, self.indices, self.transform = base, [int(i) for i in indices], transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image, label = self.base[self.indices[i]]
        return self.transform(image), int(label)


class Cutout:
    """Zero one random ``size`` x ``size`` square of a tensor image ``[C, H, W]`` (DeVries & Taylor, 2017).

    The square's centre is uniform over the image and the square is clipped at the borders, so it may be
    partly outside (unlike ``RandomErasing``, which keeps its rectangle inside). Applied after
    normalisation, the square is the mean colour.
    """

    def __init__(self, size):
        self.size = size

    def __call__(self, image):
        h, w = image.shape[-2:]
        y, x = torch.randint(h, ()).item(), torch.randint(w, ()).item()
        image = image.clone()
        image[..., max(y - self.size // 2, 0):y + (self.size + 1) // 2,
              max(x - self.size // 2, 0):x + (self.size + 1) // 2] = 0
        return image

    def __repr__(self):
        return f"Cutout(size={self.size})"


class Digits(Dataset):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images) as (PIL gray image, label)."""

    def __init__(self):
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError("digits: needs scikit-learn (pip install scikit-learn)") from e
        digits = load_digits()
        self.images = torch.from_numpy(digits.images * (255 / 16)).round().to(torch.uint8)   # 0..16 -> 0..255
        self.targets = [int(t) for t in digits.target]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return Image.fromarray(self.images[i].numpy(), mode="L"), self.targets[i]


def _transform(size, gray, augment, first=()):
    steps = list(first) + [transforms.Resize((size, size))]
    if augment:
        steps += [transforms.RandomHorizontalFlip(), transforms.RandomRotation(degrees=(0, 180))]
    steps.append(transforms.ToTensor())
    if not gray:
        steps.append(transforms.Normalize(MEAN, STD))
    if augment:
        steps.append(Cutout(size // 4))
    return transforms.Compose(steps)


def _split_off(indices, fraction, seed):
    """(kept, drawn): ``int(len * fraction)`` of ``indices`` drawn at random with ``seed``, sorted."""
    indices = torch.as_tensor(indices, dtype=torch.long)
    perm = indices[torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))]
    n = int(len(indices) * fraction)
    return sorted(perm[n:].tolist()), sorted(perm[:n].tolist())


def _open(name, path, download, make):
    """``make()``, with torchvision's errors for missing or failed data made one line that says what to do."""
    try:
        return make()
    except (RuntimeError, OSError) as e:
        if download:
            raise RuntimeError(f"{name}: could not download into {path}: {first_line(e)}") from e
        state = "incomplete or corrupted data" if Path(path).exists() else "no data"
        hint = ("pass --download to fetch it (needs network)" if name != "imagefolder"
                else "expected train/<class>/*.png and test/<class>/*.png")
        raise FileNotFoundError(f"{name}: {state} at {path}; {hint}") from e


def _mnist(name, cls, root, download):
    raw = root / cls.__name__ / "raw"
    for archive, _ in cls.resources:         # archives copied in by hand: extract them as the downloader does
        if (raw / archive).is_file() and not (raw / archive).with_suffix("").is_file():
            extract_archive(str(raw / archive))
    return [_open(name, raw, download, lambda train=train: cls(root, train=train, download=download))
            for train in (True, False)]


class IdxImages(Dataset):
    """Gray images and their labels read from a pair of gzipped IDX files (the MNIST family's format), as
    (PIL gray image, label) like torchvision's MNIST classes; ``classes`` names the labels."""

    def __init__(self, images_path, labels_path, classes):
        self.paths = [Path(images_path), Path(labels_path)]
        self.images = read_idx(images_path, ndim=3)
        self.targets = read_idx(labels_path, ndim=1)
        self.classes = list(classes)
        if len(self.images) != len(self.targets):
            raise ValueError(f"{images_path}: {len(self.images)} images but {labels_path} has "
                             f"{len(self.targets)} labels")
        if len(self.targets) and int(self.targets.max()) >= len(self.classes):
            raise ValueError(f"{labels_path}: label {int(self.targets.max())} beyond the {len(self.classes)} classes")

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return Image.fromarray(self.images[i].numpy(), mode="L"), int(self.targets[i])


def read_idx(path, ndim):
    """The uint8 tensor of a gzipped IDX file with ``ndim`` dimensions; ValueError (one line) for any other file.

    torchvision's reader takes uncompressed files inside its own folder layout; the system's copy is
    gzipped and read-only, so it is read here."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable gzip file ({type(e).__name__})") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes with {ndim} dimension(s)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    size = int(torch.tensor(shape, dtype=torch.float64).prod().item())
    if len(raw) - header != size:
        raise ValueError(f"{path}: {len(raw) - header} bytes of data, its header {shape} says {size}")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).view(shape)


def _system_fashion():
    """The system's Fashion-MNIST (train, test) as IdxImages, or None when it is not installed."""
    folder = SYSTEM_FASHION
    if not all((folder / f"{prefix}-{kind}.gz").is_file() for prefix in ("train", "t10k")
               for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")):
        return None
    return [IdxImages(folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz",
                      datasets.FashionMNIST.classes) for prefix in ("train", "t10k")]


def _fashion(root, download):
    """Fashion-MNIST from ``root`` (torchvision's layout), else from the system's copy; the error names both."""
    raw = root / "FashionMNIST" / "raw"
    if download or (raw.is_dir() and any(raw.iterdir())):
        return _mnist("fashion", datasets.FashionMNIST, root, download)
    system = _system_fashion()
    if system is not None:
        return system
    raise FileNotFoundError(f"fashion: no data at {raw} nor at {SYSTEM_FASHION}; pass --download to fetch it "
                            f"(needs network) or install it with apt-get install dataset-fashion-mnist")


def _cifar(name, cls, root, download):
    return [_open(name, root / cls.base_folder, download,
                  lambda train=train: cls(root, train=train, download=download)) for train in (True, False)]


def _load_gray(path):
    with open(path, "rb") as f:
        return Image.open(f).convert("L")


def _imagefolder(root):
    """train/ and test/ as ImageFolders, and whether the images are gray (judged by the first one)."""
    train, test = [_open("imagefolder", root / split, False, lambda split=split: datasets.ImageFolder(root / split))
                   for split in ("train", "test")]
    if test.classes != train.classes:
        raise ValueError(f"imagefolder: the class folders of {root / 'test'} ({', '.join(test.classes)}) "
                         f"are not those of {root / 'train'} ({', '.join(train.classes)})")
    gray = ImageReader(_mode)(train.samples[0][0]) in _GRAY_MODES
    train.loader = test.loader = ImageReader(_load_gray if gray else default_loader)
    return train, test, gray


def _mode(path):
    with Image.open(path) as image:
        return image.mode


def _identity(path):
    return path


def _flowers(root, download, seed):
    """torchvision's three Flowers102 splits pooled, items (image path, label), and the indices of our splits.

    Per class: TEST_SEED draws FLOWERS_PER_CLASS test images, then ``seed`` draws FLOWERS_PER_CLASS
    validation images from the rest, and the rest (at least 20 of the 40 to 258 a class has) is training.
    """
    pool = ConcatDataset([_open("flowers", root / "flowers-102", download, lambda split=split: datasets.Flowers102(
        root, split=split, download=download, loader=_identity)) for split in ("train", "val", "test")])
    labels = torch.tensor([label for _, label in pool])
    train, val, test = [], [], []
    for c in labels.unique().tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=torch.Generator().manual_seed(TEST_SEED))]
        rest = members[FLOWERS_PER_CLASS:]
        rest = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))]
        test += members[:FLOWERS_PER_CLASS].tolist()
        val += rest[:FLOWERS_PER_CLASS].tolist()
        train += rest[FLOWERS_PER_CLASS:].tolist()
    return pool, (sorted(train), sorted(val), sorted(test))


def _digits(seed):
    """The digits and the indices of our splits: stratified, the test set drawn with TEST_SEED, then
    validation from the rest with ``seed``."""
    from sklearn.model_selection import train_test_split

    digits = Digits()
    n = len(digits)
    rest, test = train_test_split(range(n), test_size=round(DIGITS_TEST_FRACTION * n), random_state=TEST_SEED,
                                  stratify=digits.targets)
    train, val = train_test_split(rest, test_size=round(VAL_FRACTION * n), random_state=seed,
                                  stratify=[digits.targets[i] for i in rest])
    return digits, (sorted(train), sorted(val), sorted(test))


def _entries(dataset):
    """(name, size) of what ``dataset`` is read from: its files (names relative to the data's root, so that a
    moved folder is the same data), or the shape of the array it holds."""
    if isinstance(dataset, ConcatDataset):
        return [entry for part in dataset.datasets for entry in _entries(part)]
    if isinstance(dataset, datasets.ImageFolder):
        root = Path(dataset.root).parent
        return [(str(Path(path).relative_to(root)), os.stat(path).st_size) for path, _ in dataset.samples]
    if isinstance(dataset, datasets.Flowers102):
        return [(Path(path).name, os.stat(path).st_size) for path in dataset._image_files]
    if isinstance(dataset, IdxImages):  # the file names and sizes, not their 60,000 images
        return [(path.name, os.stat(path).st_size) for path in dataset.paths]
    array = getattr(dataset, "data", getattr(dataset, "images", None))
    return [(f"{type(dataset).__name__} {tuple(array.shape)}", 0)]


def fingerprint(*parts) -> dict:
    """What a resumed run compares to know that its data are those it started with (a file more or less
    shifts the seeded validation split), cheap even for 70,000 images: ``count`` images (``of`` files where
    each is one), a hash of the files' names (or arrays' shapes) and one of the names with the sizes."""
    entries = [entry for part in parts for entry in _entries(part)]
    files = all(isinstance(part, (datasets.ImageFolder, datasets.Flowers102, ConcatDataset)) for part in parts)

    def digest(lines):
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    return {"count": len(entries) if files else sum(len(part) for part in parts), "of": "files" if files else "images",
            "names": digest(name for name, _ in entries), "sizes": digest(f"{name} {size}" for name, size in entries)}


def load(name, root, model_input_size, download=False, seed=0, augment=None):
    """The train / validation / test splits of data set ``name`` (one of ``DATASETS``) under ``root``.

    ``download=True`` fetches a missing torchvision data set into ``root`` (it does not apply to
    imagefolder, and digits is bundled with scikit-learn). ``augment`` turns training augmentation on or
    off; ``None`` means on for cifar10, cifar100 and flowers.
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {', '.join(DATASETS)}; got {name!r}")
    if isinstance(model_input_size, bool) or not isinstance(model_input_size, int) or model_input_size < 1:
        raise ValueError(f"model_input_size must be a positive int (32 or 224); got {model_input_size!r}")
    augment = name in AUGMENTED if augment is None else bool(augment)
    root, first = Path(root), ()

    if name == "flowers":
        base, (train_idx, val_idx, test_idx) = _flowers(root, download, seed)
        test_base, gray, num_classes = base, False, len(datasets.Flowers102.classes)
        first = (default_loader,)                   # the pooled items are image paths: read the image first
    elif name == "digits":
        base, (train_idx, val_idx, test_idx) = _digits(seed)
        test_base, gray, num_classes = base, True, 10
    else:                                           # a training file and a test file
        if name == "fashion":
            (base, test_base), gray = _fashion(root, download), True
        elif name == "kuzushiji":
            (base, test_base), gray = _mnist(name, datasets.KMNIST, root, download), True
        elif name in ("cifar10", "cifar100"):
            cls, gray = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100, False
            base, test_base = _cifar(name, cls, root, download)
        else:
            base, test_base, gray = _imagefolder(root)
        num_classes = len(base.classes)
        train_idx, val_idx = _split_off(range(len(base)), VAL_FRACTION, seed)
        test_idx = range(len(test_base))

    plain = _transform(model_input_size, gray, False, first)
    return Splits(train=View(base, train_idx, _transform(model_input_size, gray, augment, first)),
                  val=View(base, val_idx, plain), test=View(test_base, test_idx, plain),
                  num_classes=num_classes, in_channels=1 if gray else 3,
                  fingerprint=fingerprint(base) if test_base is base else fingerprint(base, test_base))
