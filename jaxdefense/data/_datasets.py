"""Data sets as NumPy arrays: the `Dataset` container and `load`.

Every loader returns images as ``np.float32 [N, H, W, C]`` in ``[0, 1]`` and labels as
``np.int32 [N]``.  Sources, tried in a documented order:

* ``digits``: scikit-learn's bundled 8x8 digits (no download, ever).
* ``fashion_mnist``: IDX files in an explicit ``data_dir``, under
  ``$JAXDEFENSE_DATA_DIR``, in the Debian package path ``/usr/share/datasets/fashion-mnist``
  (``apt-get install dataset-fashion-mnist``), then TensorFlow Datasets.
* ``mnist``: IDX files (``data_dir`` / ``$JAXDEFENSE_DATA_DIR``), then TensorFlow Datasets.
* ``cifar10`` / ``cifar100``: the python-pickle folders ``cifar-10-batches-py`` /
  ``cifar-100-python``, then TensorFlow Datasets.

The TensorFlow Datasets (TFDS) path does not need TensorFlow: it reads prepared
``array_record`` files through ``builder.as_data_source`` (random access, NumPy
examples).  It never downloads unless ``download=True`` is passed.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import pickle
from typing import Any

import numpy as np

from jaxdefense import _checks

__all__ = [
    "Dataset", "DatasetNotFoundError", "load", "names", "channel_stats", "read_idx",
    "ENV_VAR", "SPLITS",
]

#: Environment variable naming a root folder that holds one folder per data set.
ENV_VAR = "JAXDEFENSE_DATA_DIR"

#: Split names accepted by `load`.
SPLITS = ("train", "test", "validation")


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Static description of one data set."""
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  kind: str  # "sklearn", "idx" or "cifar"
  train_size: int
  test_size: int
  tfds_name: str | None
  local_dirnames: tuple[str, ...] = ()
  system_dirs: tuple[str, ...] = ()
  how_to_get: str = ""


_TFDS_HINT = (
    "  * TensorFlow Datasets: with internet access, call "
    "jaxdefense.data.load({name!r}, split, download=True) once (TFDS downloads and "
    "prepares array_record files under ~/tensorflow_datasets or data_dir; if preparing "
    "fails for lack of TensorFlow, `pip install tensorflow` for that one run), or copy a "
    "prepared TFDS folder ({tfds}/<version>/ in array_record format) into data_dir.")

_SPECS: dict[str, _Spec] = {
    "digits": _Spec(
        name="digits", num_classes=10, image_shape=(8, 8, 1), kind="sklearn",
        train_size=1437, test_size=360, tfds_name=None),
    "mnist": _Spec(
        name="mnist", num_classes=10, image_shape=(28, 28, 1), kind="idx",
        train_size=60000, test_size=10000, tfds_name="mnist",
        local_dirnames=("mnist", "MNIST/raw", "MNIST"),
        how_to_get=(
            "  * local files: put the four IDX files train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
            "t10k-labels-idx1-ubyte.gz (gzipped or not) in a folder and pass "
            "data_dir=that folder, or put them in $JAXDEFENSE_DATA_DIR/mnist/.")),
    "fashion_mnist": _Spec(
        name="fashion_mnist", num_classes=10, image_shape=(28, 28, 1), kind="idx",
        train_size=60000, test_size=10000, tfds_name="fashion_mnist",
        local_dirnames=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw",
                        "FashionMNIST"),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        how_to_get=(
            "  * Debian/Ubuntu: `apt-get install dataset-fashion-mnist` (installs "
            "/usr/share/datasets/fashion-mnist).\n"
            "  * local files: download the four IDX files train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
            "t10k-labels-idx1-ubyte.gz from https://github.com/zalandoresearch/fashion-mnist "
            "into a folder and pass data_dir=that folder, or put them in "
            "$JAXDEFENSE_DATA_DIR/fashion-mnist/.")),
    "cifar10": _Spec(
        name="cifar10", num_classes=10, image_shape=(32, 32, 3), kind="cifar",
        train_size=50000, test_size=10000, tfds_name="cifar10",
        local_dirnames=("cifar-10-batches-py",),
        how_to_get=(
            "  * local files: download and extract "
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and pass "
            "data_dir=the folder containing cifar-10-batches-py/ (or that folder "
            "itself), or extract it into $JAXDEFENSE_DATA_DIR.")),
    "cifar100": _Spec(
        name="cifar100", num_classes=100, image_shape=(32, 32, 3), kind="cifar",
        train_size=50000, test_size=10000, tfds_name="cifar100",
        local_dirnames=("cifar-100-python",),
        how_to_get=(
            "  * local files: download and extract "
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and pass "
            "data_dir=the folder containing cifar-100-python/ (or that folder itself), "
            "or extract it into $JAXDEFENSE_DATA_DIR.")),
}

# Per-channel mean and standard deviation of each training set (pixels in [0, 1],
# population std over all pixels of a channel).  CIFAR values are the usual published
# constants; digits and fashion_mnist were computed from the arrays `load` returns.
_CHANNEL_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3046,), (0.3759,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# Fixed seed of the digits train/test permutation (independent of `load(seed=...)`).
_DIGITS_SPLIT_SEED = 20240607


class DatasetNotFoundError(FileNotFoundError):
  """Raised by `load` when a data set is found in none of the places searched.

  The message names the data set, every place that was searched and how to obtain
  the data.  It subclasses ``FileNotFoundError`` (hence ``OSError``).
  """


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
  """An in-memory labelled image data set.

  Attributes:
    images: ``np.float32 [N, H, W, C]`` with values in ``[0, 1]``.
    labels: ``np.int32 [N]`` with values in ``[0, num_classes)``.
    num_classes: number of classes ``K``.
    name: data set name, e.g. ``"cifar10"``.
    split: split name, e.g. ``"train"``, ``"test"`` or ``"validation"``.
    source: where the data came from (a folder, ``"sklearn"``, ``"tfds:..."``...);
      informational only.

  Raises (on construction):
    ValueError: images not of rank 4, labels not of rank 1, or different lengths;
      NaN or infinite pixels, pixels outside ``[0, 1]`` (e.g. a ``[0, 255]`` scale);
      labels outside ``[0, num_classes)``; ``num_classes < 1``.
    TypeError: non-floating images (divide integer images by 255), non-integer labels
      or ``num_classes``.
  """
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str
  split: str
  source: str = ""

  def __post_init__(self):
    images = np.asarray(self.images)
    labels = np.asarray(self.labels)
    _checks.check_rank(images, "images", (4,), "a batch of images [N, H, W, C]")
    _checks.check_rank(labels, "labels", (1,), "integer labels [N]")
    if images.shape[0] != labels.shape[0]:
      raise ValueError(f"images and labels must have the same length; got "
                       f"{images.shape[0]} images and {labels.shape[0]} labels.")
    num_classes = _checks.check_int(self.num_classes, "num_classes", minimum=1)
    _checks.check_images(images, "images")
    _checks.check_labels(labels, num_classes, "labels")
    object.__setattr__(self, "num_classes", num_classes)
    object.__setattr__(self, "images", images.astype(np.float32, copy=False))
    object.__setattr__(self, "labels", labels.astype(np.int32, copy=False))

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def __repr__(self) -> str:
    return (f"Dataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes}, "
            f"source={self.source!r})")

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of one image."""
    return tuple(int(d) for d in self.images.shape[1:])

  def take(self, n: int) -> Dataset:
    """The first ``min(n, len(self))`` examples, as a new `Dataset`.

    Args:
      n: number of examples, ``>= 0``.

    Returns:
      A `Dataset` with the same metadata.

    Raises:
      TypeError / ValueError: ``n`` not an integer ``>= 0``.
    """
    n = _checks.check_int(n, "n", minimum=0)
    return dataclasses.replace(self, images=self.images[:n], labels=self.labels[:n])

  def subset(self, indices: Any) -> Dataset:
    """The examples at ``indices`` (an int array ``[M]`` or a bool mask ``[N]``).

    Args:
      indices: integer indices in ``[-N, N)`` or a boolean mask of length ``N``.

    Returns:
      A `Dataset` with copies of the selected examples, in the given order.

    Raises:
      TypeError: indices neither integer nor boolean.
      ValueError: indices not 1-D, a mask of the wrong length, or out of range.
    """
    idx = np.asarray(indices)
    if idx.ndim != 1:
      raise ValueError(f"indices must be 1-D; got shape {idx.shape}.")
    if idx.dtype == np.bool_:
      if idx.shape[0] != len(self):
        raise ValueError(f"a boolean mask must have length {len(self)}; got {idx.shape[0]}.")
    elif idx.size == 0:
      idx = idx.astype(np.int64)
    elif not np.issubdtype(idx.dtype, np.integer):
      raise TypeError(f"indices must be integers or a boolean mask; got dtype {idx.dtype}.")
    elif idx.min() < -len(self) or idx.max() >= len(self):
      raise ValueError(f"indices must lie in [0, {len(self)}); got values in "
                       f"[{idx.min()}, {idx.max()}].")
    return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx])


# --------------------------------------------------------------------------------------
# Public helpers.


def names() -> tuple[str, ...]:
  """Names accepted by `load`: ``("digits", "mnist", "fashion_mnist", "cifar10", "cifar100")``."""
  return tuple(_SPECS)


def _canonical_name(name: Any, argname: str = "name") -> str:
  if not isinstance(name, str):
    raise TypeError(f"{argname} must be a data set name (str), one of {sorted(_SPECS)}; "
                    f"got {name!r}.")
  key = name.strip().lower().replace("-", "_")
  if key not in _SPECS:
    raise ValueError(f"unknown data set {argname}={name!r}; expected one of "
                     f"{sorted(_SPECS)}.")
  return key


def channel_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of a data set's training images (pixels in ``[0, 1]``).

  Meant for the model's input normalisation layer, ``(x - mean) / std``.

  Args:
    name: a data set name from `names()` (hyphens and case are tolerated).

  Returns:
    ``(mean, std)``, two tuples of ``C`` Python floats (``C = 1`` for the grey-scale
    sets, ``3`` for CIFAR), e.g. CIFAR-10 ``((0.4914, 0.4822, 0.4465),
    (0.2470, 0.2435, 0.2616))``.

  Raises:
    ValueError: unknown name.
  """
  return _CHANNEL_STATS[_canonical_name(name)]


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Read one IDX file (the MNIST format), gzipped or not.

  The gzip compression is recognised from the file's magic bytes, not its name.

  Args:
    path: file path.

  Returns:
    A read-only NumPy array with the file's shape and element type (``uint8`` for
    MNIST-style images ``[N, H, W]`` and labels ``[N]``).

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a well-formed IDX file (bad magic number, unknown type code or
      a size that does not match the header).
  """
  path = os.fspath(path)
  st = os.stat(path)
  return _read_idx_cached(path, st.st_mtime_ns, st.st_size)


_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
  del mtime_ns, size  # cache keys only: a changed file is read again
  with open(path, "rb") as f:
    head = f.read(2)
  opener = gzip.open if head == b"\x1f\x8b" else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise ValueError(f"cannot read IDX file {path!r}: {e}") from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
    raise ValueError(f"{path!r} is not an IDX file (bad magic number "
                     f"{data[:4].hex() if data else 'empty'}).")
  dtype = np.dtype(_IDX_TYPES[data[2]])
  ndim = data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f"IDX file {path!r} is truncated inside its header.")
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(data) - header != expected:
    raise ValueError(f"IDX file {path!r} has {len(data) - header} data bytes but its "
                     f"header {shape} needs {expected}.")
  arr = np.frombuffer(data, dtype, offset=header).reshape(shape)
  arr = arr.astype(dtype.newbyteorder("="), copy=False)
  arr.flags.writeable = False
  return arr


# --------------------------------------------------------------------------------------
# Local readers.  Each returns (uint8 images [N, H, W, C], integer labels [N]) or None
# when the folder does not hold the split's files.


def _find_idx_file(folder: str, stem: str) -> str | None:
  for candidate in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                    stem.replace("-idx", ".idx") + ".gz"):
    path = os.path.join(folder, candidate)
    if os.path.isfile(path):
      return path
  return None


def _read_idx_split(folder: str, split: str) -> tuple[np.ndarray, np.ndarray] | None:
  prefix = "train" if split == "train" else "t10k"
  img_path = _find_idx_file(folder, f"{prefix}-images-idx3-ubyte")
  lab_path = _find_idx_file(folder, f"{prefix}-labels-idx1-ubyte")
  if img_path is None or lab_path is None:
    return None
  images = read_idx(img_path)
  labels = read_idx(lab_path)
  if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
    raise ValueError(f"IDX files in {folder!r} do not match: images {images.shape} from "
                     f"{img_path!r}, labels {labels.shape} from {lab_path!r}; expected "
                     "[N, H, W] and [N].")
  return images[..., None], labels


class _CifarUnpickler(pickle.Unpickler):
  """Unpickler that only rebuilds plain NumPy arrays (the CIFAR batch format)."""

  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
      ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
      ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
  }

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(
        f"refusing to load {module}.{name} from a CIFAR batch file (only NumPy arrays, "
        "lists and dicts are expected).")


def _load_cifar_batch(path: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
  with open(path, "rb") as f:
    try:
      batch = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:
      raise ValueError(f"cannot read CIFAR batch file {path!r}: {e}") from e
  if not isinstance(batch, dict):
    raise ValueError(f"CIFAR batch file {path!r} does not hold a dict.")
  batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
  key = label_key.decode()
  if "data" not in batch or key not in batch:
    raise ValueError(f"CIFAR batch file {path!r} lacks 'data' or {key!r}; keys: "
                     f"{sorted(batch)}.")
  data = np.asarray(batch["data"], dtype=np.uint8)
  labels = np.asarray(batch[key])
  if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
    raise ValueError(f"CIFAR batch file {path!r} has data {data.shape} and labels "
                     f"{labels.shape}; expected [N, 3072] and [N].")
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, labels


def _read_cifar_split(folder: str, split: str,
                      spec: _Spec) -> tuple[np.ndarray, np.ndarray] | None:
  if spec.name == "cifar10":
    files = ([f"data_batch_{i}" for i in range(1, 6)] if split == "train"
             else ["test_batch"])
    label_key = b"labels"
  else:
    files = ["train" if split == "train" else "test"]
    label_key = b"fine_labels"
  paths = [os.path.join(folder, f) for f in files]
  if not all(os.path.isfile(p) for p in paths):
    return None
  parts = [_load_cifar_batch(p, label_key) for p in paths]
  images = np.concatenate([p[0] for p in parts])
  labels = np.concatenate([p[1] for p in parts])
  return images, labels


def _candidate_dirs(spec: _Spec, data_dir: str | None) -> list[str]:
  """Folders to search, in order (explicit data_dir, $JAXDEFENSE_DATA_DIR, system)."""
  dirs: list[str] = []
  if data_dir is not None:
    dirs.append(data_dir)
    dirs.extend(os.path.join(data_dir, d) for d in spec.local_dirnames)
  env = os.environ.get(ENV_VAR, "")
  for root in (r for r in env.split(os.pathsep) if r):
    dirs.extend(os.path.join(root, d) for d in spec.local_dirnames)
  dirs.extend(spec.system_dirs)
  seen, out = set(), []
  for d in dirs:
    if d not in seen:
      seen.add(d)
      out.append(d)
  return out


# --------------------------------------------------------------------------------------
# TensorFlow Datasets without TensorFlow.


def _read_data_source(source: Any) -> tuple[np.ndarray, np.ndarray]:
  """All (image, label) pairs of a random-access TFDS data source, as arrays."""
  n = len(source)
  examples: list[Any] = []
  chunk = 1024
  getitems = getattr(source, "__getitems__", None)
  start = 0
  if getitems is not None and n:
    try:
      examples.extend(getitems(list(range(min(chunk, n)))))
      start = min(chunk, n)
    except TypeError:  # some mocks and old versions only support __getitem__
      getitems = None
  while start < n:
    stop = min(start + chunk, n)
    if getitems is not None:
      examples.extend(getitems(list(range(start, stop))))
    else:
      examples.extend(source[i] for i in range(start, stop))
    start = stop
  if not examples:
    raise ValueError("the TFDS data source is empty.")
  images = np.stack([np.asarray(ex["image"]) for ex in examples])
  labels = np.asarray([int(ex["label"]) for ex in examples])
  if images.ndim == 3:
    images = images[..., None]
  return images, labels


class _TfdsNotPrepared(Exception):
  """The TFDS builder has no prepared files (a plain reason, no traceback noise)."""


def _load_tfds(spec: _Spec, split: str, data_dir: str | None,
               download: bool) -> tuple[np.ndarray, np.ndarray, str]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  if download:
    builder.download_and_prepare(file_format="array_record")
  try:
    source = builder.as_data_source(split=split)
  except Exception as e:
    prepared = True
    try:
      prepared = builder.is_prepared()
    except Exception:  # noqa: BLE001 - keep the original error
      pass
    if not prepared:
      raise _TfdsNotPrepared(
          f"not prepared in {builder.data_dir} (no dataset_info.json there)") from e
    raise
  images, labels = _read_data_source(source)
  return images, labels, f"tfds:{spec.tfds_name}/{split}"


# --------------------------------------------------------------------------------------
# load.


def _to_float(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype == np.uint8:
    out = images.astype(np.float32)
    out *= np.float32(1.0 / 255.0)
    return out
  out = images.astype(np.float32)
  if out.size and (out.min() < 0 or out.max() > 1):
    raise ValueError(f"loaded images of dtype {images.dtype} are outside [0, 1] "
                     f"(range [{out.min()}, {out.max()}]).")
  return out


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  bunch = load_digits()
  images = (np.asarray(bunch.images, np.float32) / np.float32(16.0))[..., None]
  labels = np.asarray(bunch.target, np.int32)
  perm = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(labels))
  spec = _SPECS["digits"]
  test_idx = np.sort(perm[:spec.test_size])
  train_idx = np.sort(perm[spec.test_size:])
  return {"train": (images[train_idx], labels[train_idx]),
          "test": (images[test_idx], labels[test_idx])}, "sklearn.datasets.load_digits"


def _load_raw(spec: _Spec, split: str, data_dir: str | None,
              download: bool) -> tuple[np.ndarray, np.ndarray, str]:
  """Raw (images, labels, source) of the 'train' or 'test' split."""
  if spec.kind == "sklearn":
    splits, source = _load_digits()
    return (*splits[split], source)
  searched: list[str] = []
  for folder in _candidate_dirs(spec, data_dir):
    if not os.path.isdir(folder):
      searched.append(f"{folder} (no such folder)")
      continue
    if spec.kind == "idx":
      found = _read_idx_split(folder, split)
    else:
      found = _read_cifar_split(folder, split, spec)
    if found is not None:
      return (*found, folder)
    searched.append(f"{folder} (no {split} files in the expected format)")
  if not os.environ.get(ENV_VAR):
    searched.append(f"${ENV_VAR} (not set)")
  tfds_dir = data_dir if data_dir is not None else "TFDS default data_dir"
  try:
    return _load_tfds(spec, split, data_dir, download)
  except ImportError as e:
    searched.append(f"TensorFlow Datasets ({tfds_dir}): cannot import "
                    f"tensorflow_datasets ({e}); `pip install tensorflow-datasets`")
    cause: BaseException = e
  except _TfdsNotPrepared as e:
    searched.append(f"TensorFlow Datasets {spec.tfds_name!r} (download={download}): {e}")
    cause = e
  except Exception as e:  # noqa: BLE001 - any TFDS failure means "not available"
    msg = " ".join(str(e).split())
    if len(msg) > 300:
      msg = msg[:297] + "..."
    searched.append(f"TensorFlow Datasets {spec.tfds_name!r} ({tfds_dir}, "
                    f"download={download}): {type(e).__name__}: {msg}")
    cause = e
  how = spec.how_to_get + "\n" + _TFDS_HINT.format(name=spec.name, tfds=spec.tfds_name)
  raise DatasetNotFoundError(
      f"data set {spec.name!r} (split {split!r}) was not found.\nSearched, in order:\n"
      + "".join(f"  - {s}\n" for s in searched)
      + "How to get it:\n" + how) from cause


def load(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
         validation_size: int = 0, seed: int = 0, *, download: bool = False) -> Dataset:
  """Load a data set split into memory as NumPy arrays.

  Search order for the files (first hit wins):

  1. ``data_dir`` itself, then its standard sub-folders (``fashion-mnist/``,
     ``mnist/``, ``cifar-10-batches-py/``, ``cifar-100-python/``...);
  2. the same sub-folders of ``$JAXDEFENSE_DATA_DIR`` (read at call time; several
     roots may be joined with ``os.pathsep``);
  3. system folders: ``/usr/share/datasets/fashion-mnist`` for ``fashion_mnist``
     (``apt-get install dataset-fashion-mnist``);
  4. TensorFlow Datasets, reading prepared ``array_record`` files from ``data_dir``
     (or the TFDS default ``~/tensorflow_datasets`` / ``$TFDS_DATA_DIR``) through
     ``builder.as_data_source``, which needs no TensorFlow.

  ``digits`` always comes from scikit-learn (8x8 pixels, values ``/16``) with a fixed
  1437/360 train/test split.  Local formats: IDX files (``train-images-idx3-ubyte[.gz]``
  etc.) for ``mnist``/``fashion_mnist``; the python-pickle batches for CIFAR (read
  with an unpickler that only accepts NumPy arrays).

  Args:
    name: one of `names()`: ``"digits"``, ``"mnist"``, ``"fashion_mnist"``,
      ``"cifar10"``, ``"cifar100"`` (case and ``-``/``_`` are tolerated).
    split: ``"train"`` (default), ``"test"`` or ``"validation"``.
    data_dir: optional folder searched first (see above); also the TFDS ``data_dir``.
    validation_size: number of training examples held out, chosen by a permutation
      seeded with ``seed``; they form the ``"validation"`` split and are excluded
      from ``"train"`` (which keeps the original order).  Default 0: no validation
      split.
    seed: non-negative seed of the validation hold-out (ignored when
      ``validation_size == 0``).
    download: allow TFDS to download and prepare the data (needs internet; default
      False, so `load` never touches the network).

  Returns:
    A `Dataset` with images ``np.float32 [N, H, W, C]`` in ``[0, 1]`` and labels
    ``np.int32 [N]``.

  Raises:
    ValueError: unknown ``name`` (the message lists the names) or ``split``;
      ``split="validation"`` with ``validation_size == 0``; ``validation_size`` not
      smaller than the training set; malformed files.
    TypeError: arguments of the wrong type.
    DatasetNotFoundError: (a ``FileNotFoundError``) the data is in none of the places
      searched; the message lists them and says how to get the data.
  """
  key = _canonical_name(name)
  spec = _SPECS[key]
  _checks.check_choice(split, "split", SPLITS)
  validation_size = _checks.check_int(validation_size, "validation_size", minimum=0)
  seed = _checks.check_int(seed, "seed", minimum=0)
  if not isinstance(download, bool):
    raise TypeError(f"download must be a bool; got {download!r}.")
  if data_dir is not None:
    if not isinstance(data_dir, (str, os.PathLike)):
      raise TypeError(f"data_dir must be a path or None; got {data_dir!r}.")
    data_dir = os.path.expanduser(os.fspath(data_dir))
  if split == "validation" and validation_size == 0:
    raise ValueError("split='validation' needs validation_size > 0 (the validation set "
                     f"is held out from {key!r}'s training set); got validation_size=0.")
  if validation_size and validation_size >= spec.train_size:
    raise ValueError(f"validation_size must be smaller than the {spec.train_size} "
                     f"training examples of {key!r}; got {validation_size}.")

  raw_split = "test" if split == "test" else "train"
  images, labels, source = _load_raw(spec, raw_split, data_dir, download)
  if images.ndim != 4 or images.shape[1:] != spec.image_shape:
    raise ValueError(f"{key!r} images from {source!r} have shape {images.shape}; "
                     f"expected [N, {', '.join(map(str, spec.image_shape))}].")
  labels = np.asarray(labels).astype(np.int32)
  _checks.check_labels(labels, spec.num_classes, name=f"{key} labels from {source!r}")

  if split != "test" and validation_size:
    n = labels.shape[0]
    if validation_size >= n:
      raise ValueError(f"validation_size must be smaller than the {n} training "
                       f"examples found at {source!r}; got {validation_size}.")
    perm = np.random.default_rng(np.random.SeedSequence([seed, n])).permutation(n)
    if split == "validation":
      idx = np.sort(perm[:validation_size])
    else:
      idx = np.sort(perm[validation_size:])
    images, labels = images[idx], labels[idx]
  return Dataset(images=_to_float(images), labels=labels, num_classes=spec.num_classes,
                 name=key, split=split, source=source)
