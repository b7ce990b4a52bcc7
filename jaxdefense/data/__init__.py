"""Data sets, batching, augmentation and corruptions for `jaxdefense`.

Data sets come back as NumPy arrays (`Dataset`: images ``np.float32 [N, H, W, C]`` in
``[0, 1]``, labels ``np.int32 [N]``); `batches` iterates over them deterministically
and resumably; `augment` and `corrupt` are jittable JAX functions that work on a whole
batch on device.  This subpackage depends on nothing else in `jaxdefense` except the
argument checks of ``jaxdefense._checks``.

Example::

  import jaxdefense as jd
  ds = jd.data.load("digits", "train", validation_size=200)
  for x, y in jd.data.batches(ds, 64, seed=0, epoch=3):
    ...
"""

from __future__ import annotations

from ._augment import augment as augment
from ._augment import random_crop as random_crop
from ._augment import random_flip as random_flip
from ._corrupt import CIFAR_C_CORRUPTIONS as CIFAR_C_CORRUPTIONS
from ._corrupt import corrupt as corrupt
from ._corrupt import corruption_constant as corruption_constant
from ._corrupt import corruption_kinds as corruption_kinds
from ._corrupt import load_corrupted as load_corrupted
from ._datasets import ENV_VAR as ENV_VAR
from ._datasets import SPLITS as SPLITS
from ._datasets import Dataset as Dataset
from ._datasets import DatasetNotFoundError as DatasetNotFoundError
from ._datasets import channel_stats as channel_stats
from ._datasets import load as load
from ._datasets import names as names
from ._iterator import batches as batches
from ._iterator import epoch_order as epoch_order
from ._iterator import num_batches as num_batches

__all__ = [
    "CIFAR_C_CORRUPTIONS",
    "Dataset",
    "DatasetNotFoundError",
    "ENV_VAR",
    "SPLITS",
    "augment",
    "batches",
    "channel_stats",
    "corrupt",
    "corruption_constant",
    "corruption_kinds",
    "epoch_order",
    "load",
    "load_corrupted",
    "names",
    "num_batches",
    "random_crop",
    "random_flip",
]

from ._runner import run_batches as run_batches
from ._sharding import batch_sharding as batch_sharding
from ._sharding import make_mesh as make_mesh
from ._sharding import replicated as replicated
from ._sharding import shard_batch as shard_batch
from ._sharding import state_sharding as state_sharding

__all__ += ["run_batches", "batch_sharding", "make_mesh", "replicated", "shard_batch",
            "state_sharding"]
