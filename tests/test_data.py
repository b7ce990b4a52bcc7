"""Tests of jaxdefense.data: loading, batching and augmentation."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense import data
from jaxdefense.data import _datasets

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
  """Tests control the search path themselves."""
  monkeypatch.delenv(data.ENV_VAR, raising=False)


@pytest.fixture
def no_system_dirs(monkeypatch):
  """Hide /usr/share/datasets/fashion-mnist from the search path."""
  for name, spec in list(_datasets._SPECS.items()):
    monkeypatch.setitem(_datasets._SPECS, name, dataclasses.replace(spec, system_dirs=()))


def write_idx(path, array, compress=False):
  array = np.asarray(array)
  code = {np.dtype(np.uint8): 0x08, np.dtype(np.int16): 0x0B,
          np.dtype(np.float32): 0x0D}[array.dtype]
  header = struct.pack(">BBBB", 0, 0, code, array.ndim)
  header += struct.pack(">" + "I" * array.ndim, *array.shape)
  payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  opener = gzip.open if compress else open
  with opener(path, "wb") as f:
    f.write(payload)


def write_mnist_dir(folder, n_train=20, n_test=6, compress=True, seed=0):
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  out = {}
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.uint8)
    ext = ".gz" if compress else ""
    write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte{ext}"), images, compress)
    write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{ext}"), labels, compress)
    out[prefix] = (images, labels)
  return out


# ------------------------------------------------------------------------------------
# digits


def test_digits_shapes_dtypes_range():
  train = data.load("digits", "train")
  test = data.load("digits", "test")
  assert isinstance(train, data.Dataset)
  assert train.images.shape == (1437, 8, 8, 1) and test.images.shape == (360, 8, 8, 1)
  assert train.images.dtype == np.float32 and train.labels.dtype == np.int32
  assert len(train) == 1437 and train.image_shape == (8, 8, 1)
  assert train.num_classes == 10 and train.name == "digits" and train.split == "train"
  for ds in (train, test):
    assert 0.0 <= ds.images.min() and ds.images.max() == 1.0
    assert set(np.unique(ds.labels)) == set(range(10))
  # Values are the sklearn counts / 16.
  assert np.allclose(train.images * 16, np.round(train.images * 16))
  # Train and test partition sklearn's 1797 digits.
  from sklearn.datasets import load_digits
  bunch = load_digits()
  rows = lambda imgs, labs: sorted(
      np.asarray(x, np.float32).tobytes() + bytes([int(y)]) for x, y in zip(imgs, labs))
  assert rows(bunch.images / 16.0, bunch.target) == rows(
      np.concatenate([train.images, test.images])[..., 0],
      np.concatenate([train.labels, test.labels]))


def test_digits_deterministic_and_fresh_arrays():
  a = data.load("digits", "test")
  b = data.load("digits", "test")
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, b.labels)
  a.images[0] = 0.0  # mutating one result must not leak into the next
  c = data.load("digits", "test")
  np.testing.assert_array_equal(b.images, c.images)


def test_validation_split_disjoint_deterministic():
  full = data.load("digits", "train")
  tr = data.load("digits", "train", validation_size=200, seed=3)
  va = data.load("digits", "validation", validation_size=200, seed=3)
  assert len(tr) == 1237 and len(va) == 200 and va.split == "validation"
  rows = lambda d: [x.tobytes() + bytes([int(y)]) for x, y in zip(d.images, d.labels)]
  # train + validation is exactly the full training set (as a multiset): a partition.
  assert sorted(rows(tr) + rows(va)) == sorted(rows(full))
  va2 = data.load("digits", "validation", validation_size=200, seed=3)
  np.testing.assert_array_equal(va.images, va2.images)
  va_other = data.load("digits", "validation", validation_size=200, seed=4)
  assert not np.array_equal(va.labels, va_other.labels) or not np.array_equal(
      va.images, va_other.images)
  # The test split ignores validation_size.
  np.testing.assert_array_equal(
      data.load("digits", "test", validation_size=200).images,
      data.load("digits", "test").images)


def test_dataset_helpers():
  ds = data.load("digits", "test")
  assert len(ds.take(10)) == 10 and len(ds.take(10_000)) == 360
  np.testing.assert_array_equal(ds.take(5).labels, ds.labels[:5])
  sub = ds.subset(np.array([3, 1]))
  np.testing.assert_array_equal(sub.images[0], ds.images[3])
  assert len(ds.subset(ds.labels == 0)) == int(np.sum(ds.labels == 0))
  assert "digits" in repr(ds) and "360" in repr(ds)
  with pytest.raises(ValueError, match="indices"):
    ds.subset(np.array([360]))
  with pytest.raises(ValueError, match="images and labels"):
    data.Dataset(np.zeros((3, 2, 2, 1), np.float32), np.zeros(2, np.int32), 10, "x", "y")
  with pytest.raises(TypeError, match="labels"):
    data.Dataset(np.zeros((2, 2, 2, 1), np.float32), np.zeros(2), 10, "x", "y")
  with pytest.raises(dataclasses.FrozenInstanceError):
    ds.name = "other"


def test_names_and_channel_stats():
  assert data.names() == ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100")
  mean, std = data.channel_stats("cifar10")
  assert mean == (0.4914, 0.4822, 0.4465) and std == (0.2470, 0.2435, 0.2616)
  assert len(data.channel_stats("cifar100")[0]) == 3
  assert data.channel_stats("Fashion-MNIST") == data.channel_stats("fashion_mnist")
  train = data.load("digits", "train")
  m, s = data.channel_stats("digits")
  assert abs(train.images.mean() - m[0]) < 1e-3 and abs(train.images.std() - s[0]) < 1e-3
  with pytest.raises(ValueError, match="cifar10"):
    data.channel_stats("svhn")


# ------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs():
  with pytest.raises(ValueError, match=r"unknown data set.*'svhn'.*cifar10.*digits"):
    data.load("svhn", "train")
  with pytest.raises(TypeError, match="name"):
    data.load(3, "train")
  with pytest.raises(ValueError, match="split"):
    data.load("digits", "valid")
  with pytest.raises(ValueError, match="validation_size"):
    data.load("digits", "validation")
  with pytest.raises(ValueError, match="validation_size must be smaller"):
    data.load("digits", "train", validation_size=1437)
  with pytest.raises(ValueError, match="validation_size"):
    data.load("digits", "train", validation_size=-1)
  with pytest.raises(TypeError, match="validation_size"):
    data.load("digits", "train", validation_size=0.1)
  with pytest.raises(ValueError, match="seed"):
    data.load("digits", "train", validation_size=10, seed=-1)


# ------------------------------------------------------------------------------------
# IDX and CIFAR files


def test_read_idx_formats(tmp_path):
  a = np.arange(24, dtype=np.int16).reshape(2, 3, 4) - 5
  write_idx(tmp_path / "a.idx", a)
  out = _datasets.read_idx(tmp_path / "a.idx")
  np.testing.assert_array_equal(out, a)
  assert out.dtype == np.int16 and not out.flags.writeable
  f = np.linspace(0, 1, 6, dtype=np.float32)
  write_idx(tmp_path / "f.idx.gz", f, compress=True)  # gzip found by magic bytes
  np.testing.assert_array_equal(_datasets.read_idx(tmp_path / "f.idx.gz"), f)
  (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x05abc")
  with pytest.raises(ValueError, match="not an IDX file"):
    _datasets.read_idx(tmp_path / "bad")
  (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
  with pytest.raises(ValueError, match="needs 5"):
    _datasets.read_idx(tmp_path / "short")
  with pytest.raises(FileNotFoundError):
    _datasets.read_idx(tmp_path / "missing")


@pytest.mark.parametrize("compress", [True, False])
def test_load_idx_from_data_dir(tmp_path, compress):
  raw = write_mnist_dir(tmp_path / "fmnist", compress=compress)
  ds = data.load("fashion_mnist", "train", data_dir=tmp_path / "fmnist")
  assert ds.images.shape == (20, 28, 28, 1) and ds.images.dtype == np.float32
  assert ds.source == str(tmp_path / "fmnist")
  np.testing.assert_allclose(ds.images[..., 0] * 255, raw["train"][0], atol=1e-3)
  np.testing.assert_array_equal(ds.labels, raw["train"][1])
  test = data.load("mnist", "test", data_dir=tmp_path / "fmnist")
  np.testing.assert_array_equal(test.labels, raw["t10k"][1])
  # Validation split on local files.
  va = data.load("mnist", "validation", data_dir=tmp_path / "fmnist", validation_size=5)
  tr = data.load("mnist", "train", data_dir=tmp_path / "fmnist", validation_size=5)
  assert len(va) == 5 and len(tr) == 15
  with pytest.raises(ValueError, match="validation_size must be smaller than the 20"):
    data.load("mnist", "train", data_dir=tmp_path / "fmnist", validation_size=20)


def test_env_var_search_path(tmp_path, monkeypatch, no_system_dirs):
  raw = write_mnist_dir(tmp_path / "root" / "fashion-mnist", n_train=8, seed=1)
  write_mnist_dir(tmp_path / "explicit", n_train=9, seed=2)
  monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "root"))  # read at call time
  ds = data.load("fashion_mnist", "train")
  np.testing.assert_array_equal(ds.labels, raw["train"][1])
  assert data.load("fashion_mnist", "train", data_dir=tmp_path / "explicit").images.shape[0] == 9


def write_cifar_dir(root, name, n=4, seed=0):
  rng = np.random.default_rng(seed)
  folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
  folder.mkdir(parents=True)
  files = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10"
           else ["train", "test"])
  key = b"labels" if name == "cifar10" else b"fine_labels"
  k = 10 if name == "cifar10" else 100
  out = {}
  for f in files:
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             key: [int(v) for v in rng.integers(0, k, n)], b"batch_label": b"x"}
    with open(folder / f, "wb") as fh:
      pickle.dump(batch, fh, protocol=2)
    out[f] = batch
  return folder, out


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_load_cifar_pickles(tmp_path, name):
  folder, raw = write_cifar_dir(tmp_path, name)
  train = data.load(name, "train", data_dir=tmp_path)
  test = data.load(name, "test", data_dir=folder)  # the folder itself works too
  n_train = 20 if name == "cifar10" else 4
  assert train.images.shape == (n_train, 32, 32, 3) and test.images.shape == (4, 32, 32, 3)
  assert train.num_classes == (10 if name == "cifar10" else 100)
  first = raw["data_batch_1" if name == "cifar10" else "train"][b"data"]
  # Row layout: 1024 red, 1024 green, 1024 blue values, row-major.
  i, y, x, c = 2, 5, 7, 1
  assert train.images[i, y, x, c] == pytest.approx(first[i, c * 1024 + y * 32 + x] / 255)


def test_cifar_unpickler_refuses_code(tmp_path):
  folder, _ = write_cifar_dir(tmp_path, "cifar10")

  class Evil:
    def __reduce__(self):
      return (os.getcwd, ())

  with open(folder / "test_batch", "wb") as fh:
    pickle.dump({b"data": Evil(), b"labels": []}, fh)
  with pytest.raises(ValueError, match="refusing"):
    data.load("cifar10", "test", data_dir=tmp_path)


# ------------------------------------------------------------------------------------
# fashion_mnist from the Debian package path


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR),
                    reason=f"{FASHION_DIR} absent (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_system_path():
  train = data.load("fashion_mnist", "train")
  test = data.load("fashion_mnist", "test")
  assert train.source == FASHION_DIR
  assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
  assert train.images.dtype == np.float32 and test.labels.dtype == np.int32
  assert 0.0 <= test.images.min() and test.images.max() <= 1.0
  np.testing.assert_array_equal(np.bincount(test.labels), np.full(10, 1000))
  m, s = data.channel_stats("fashion_mnist")
  assert abs(train.images.mean() - m[0]) < 1e-3 and abs(train.images.std() - s[0]) < 1e-3
  va = data.load("fashion_mnist", "validation", validation_size=5000)
  assert len(va) == 5000


# ------------------------------------------------------------------------------------
# TFDS path (no TensorFlow) and missing data


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_path_with_mock_data(tmp_path, monkeypatch, name, shape):
  tfds = pytest.importorskip("tensorflow_datasets")
  # mock_data makes scratch folders with tempfile.mkdtemp and leaves them behind: keep
  # them inside this test's tmp_path.
  import tempfile
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.load(name, "train", data_dir=tmp_path)
    va = data.load(name, "validation", data_dir=tmp_path, validation_size=4)
  assert ds.source.startswith(f"tfds:{name}")
  assert ds.images.shape == (12, *shape) and ds.images.dtype == np.float32
  assert ds.labels.dtype == np.int32 and 0 <= ds.labels.min() and ds.labels.max() < 10
  assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0 and len(va) == 4


def test_tfds_reader_handles_getitem_only_sources():
  rng = np.random.default_rng(0)
  n = 2100   # more than two of the reader's chunks, the last one partial
  pixels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
  targets = rng.integers(0, 10, n)
  examples = [{"image": pixels[i], "label": int(targets[i])} for i in range(n)]

  class Batched:   # an array_record data source: __getitems__ on lists of indices
    def __len__(self):
      return n

    def __getitem__(self, i):
      return examples[i]

    def __getitems__(self, indices):
      return [examples[i] for i in indices]

  class OldMock(Batched):   # some mocks and old versions: __getitems__ raises TypeError
    def __getitems__(self, indices):
      raise TypeError("not supported")

  for source in (examples, Batched(), OldMock()):   # a list has no __getitems__
    images, labels = _datasets._read_data_source(source)
    assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
    # every pixel and label, in order (chunk boundaries neither skip nor repeat rows)
    np.testing.assert_array_equal(images[..., 0], pixels)
    np.testing.assert_array_equal(labels, targets)


def test_missing_data_error(tmp_path, no_system_dirs):
  with pytest.raises(data.DatasetNotFoundError) as info:
    data.load("fashion_mnist", "train", data_dir=tmp_path)
  msg = str(info.value)
  assert isinstance(info.value, FileNotFoundError)
  assert "'fashion_mnist'" in msg and str(tmp_path) in msg and "JAXDEFENSE_DATA_DIR" in msg
  assert "apt-get install dataset-fashion-mnist" in msg
  assert "pip install tensorflow" in msg and "download=True" in msg
  with pytest.raises(data.DatasetNotFoundError, match="cifar-10-python.tar.gz"):
    data.load("cifar10", "test", data_dir=tmp_path)


def test_missing_tfds_package(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(data.DatasetNotFoundError, match="pip install tensorflow-datasets"):
    data.load("mnist", "train", data_dir=tmp_path)


# ------------------------------------------------------------------------------------
# Batch iterator


def small_arrays(n=23):
  images = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
  return images, np.arange(n, dtype=np.int32)


def test_num_batches():
  assert data.num_batches(23, 5) == 4
  assert data.num_batches(23, 5, drop_remainder=False) == 5
  assert data.num_batches(0, 5, False) == 0
  with pytest.raises(ValueError, match="batch_size"):
    data.num_batches(10, 0)


def test_batches_deterministic_and_resumable():
  arrays = small_arrays()
  for drop in (True, False):
    full = list(data.batches(arrays, 5, seed=7, epoch=2, drop_remainder=drop))
    again = list(data.batches(arrays, 5, seed=7, epoch=2, drop_remainder=drop))
    assert len(full) == data.num_batches(23, 5, drop)
    for (x1, y1), (x2, y2) in zip(full, again):
      np.testing.assert_array_equal(x1, x2)
      np.testing.assert_array_equal(y1, y2)
    for start in range(len(full) + 1):
      resumed = list(data.batches(arrays, 5, seed=7, epoch=2, drop_remainder=drop,
                                  start=start))
      assert len(resumed) == len(full) - start
      for (x1, y1), (x2, y2) in zip(full[start:], resumed):
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_array_equal(x1[:, 0, 0, 0], y2)


def test_batches_cover_epoch_once():
  arrays = small_arrays()
  ds = data.Dataset(arrays[0] / 23, arrays[1] % 3, 3, "toy", "train")
  seen = np.concatenate([y for _, y in data.batches(arrays, 4, drop_remainder=False)])
  assert sorted(seen.tolist()) == list(range(23))
  dropped = np.concatenate([y for _, y in data.batches(arrays, 4, epoch=1)])
  assert len(dropped) == 20 and len(set(dropped.tolist())) == 20
  x, y = next(data.batches(ds, 4))
  assert x.shape == (4, 1, 1, 1) and x.dtype == np.float32 and y.dtype == np.int32
  order = lambda **kw: np.concatenate([y for _, y in data.batches(arrays, 23, **kw)])
  assert not np.array_equal(order(epoch=0), order(epoch=1))
  assert not np.array_equal(order(seed=0), order(seed=1))
  np.testing.assert_array_equal(order(shuffle=False), np.arange(23))
  np.testing.assert_array_equal(order(seed=5, epoch=3),
                                data.epoch_order(23, seed=5, epoch=3))


def test_batches_bad_inputs():
  arrays = small_arrays()
  with pytest.raises(ValueError, match="batch_size must be >= 1; got -2"):
    data.batches(arrays, -2)  # raised at call time, not at first next()
  with pytest.raises(ValueError, match="start"):
    data.batches(arrays, 5, start=5)
  with pytest.raises(ValueError, match="seed"):
    data.batches(arrays, 5, seed=-1)
  with pytest.raises(ValueError, match="same length"):
    data.batches((arrays[0], arrays[1][:3]), 5)
  with pytest.raises(TypeError, match="Dataset"):
    data.batches(arrays[0], 5)


# ------------------------------------------------------------------------------------
# Augmentation


def shifted(image, dy, dx):
  """NumPy reference: out[i, j] = image[i + dy, j + dx], zero outside."""
  h, w = image.shape[:2]
  out = np.zeros_like(image)
  for i in range(h):
    for j in range(w):
      if 0 <= i + dy < h and 0 <= j + dx < w:
        out[i, j] = image[i + dy, j + dx]
  return out


@pytest.fixture(scope="module")
def batch():
  return np.random.default_rng(0).uniform(0.05, 1.0, (16, 8, 8, 2)).astype(np.float32)


def test_augment_shape_range_determinism(batch):
  key = jax.random.key(0)
  out = data.augment(key, batch)
  assert out.shape == batch.shape and out.dtype == batch.dtype
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  np.testing.assert_array_equal(out, data.augment(key, batch))
  assert not np.array_equal(out, data.augment(jax.random.key(1), batch))
  jitted = jax.jit(lambda k, x: data.augment(k, x, pad=2))
  np.testing.assert_array_equal(jitted(key, batch), data.augment(key, batch, pad=2))
  np.testing.assert_array_equal(data.augment(key, batch, crop=False, flip=False), batch)
  np.testing.assert_array_equal(data.augment(key, batch, pad=0, flip=False), batch)


def test_crop_is_zero_filled_shift(batch):
  pad = 2
  out = np.asarray(data.augment(jax.random.key(3), batch, pad=pad, flip=False))
  shifts = set()
  for x, y in zip(batch, out):
    matches = [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)
               if np.array_equal(shifted(x, dy, dx), y)]
    assert len(matches) == 1, "each crop must be exactly one zero-filled shift"
    shifts.add(matches[0])
  assert len(shifts) > 3  # per-image randomness
  np.testing.assert_array_equal(data.random_crop(jax.random.key(5), batch, pad=0), batch)


def test_flip_per_image(batch):
  out = np.asarray(data.augment(jax.random.key(4), batch, crop=False))
  flipped = [np.array_equal(y, x[:, ::-1]) for x, y in zip(batch, out)]
  same = [np.array_equal(y, x) for x, y in zip(batch, out)]
  assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)
  np.testing.assert_array_equal(data.random_flip(jax.random.key(4), batch)[0].shape,
                                batch[0].shape)


def test_augment_bad_inputs(batch):
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="rank 4"):
    data.augment(key, batch[0])
  with pytest.raises(TypeError, match="floating"):
    data.augment(key, (batch * 255).astype(np.uint8))
  with pytest.raises(ValueError, match="pad"):
    data.augment(key, batch, pad=-1)
  with pytest.raises(TypeError, match="pad"):
    data.augment(key, jnp.asarray(batch), pad=1.5)
