"""grain pipelines: records -> per-process batches, batch ``t`` a pure function of (seed, t).

Train: ``source -> shuffle(seed) -> repeat -> per-example map (augment with a per-index RNG) ->
batch(local) -> every process_count-th batch from process_index``. The global batch at step ``t`` is
examples ``[t*B, (t+1)*B)`` of the shuffled, repeated stream (grain reshuffles every epoch from the
seed and the epoch number); process ``p`` reads only its contiguous slice ``p*b .. (p+1)*b``. So the
data position is the step: a resumed run, or one with another process count, sees exactly the
batches it would have seen.

Eval: each eval set (validation, test) in order, padded with masked copies of its example 0 to
a whole number of global batches, each process reading its own slice of every batch.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import grain
import jax
import numpy as np


def _augment_crop_flip(image: np.ndarray, rng: np.random.Generator, padding: int,
                       flip: bool) -> np.ndarray:
  """torchvision's RandomCrop(size, padding) (zero fill) and RandomHorizontalFlip, on raw pixels."""
  h, w = image.shape[:2]
  if padding:
    image = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top, left = rng.integers(0, 2 * padding + 1, size=2)
    image = image[top:top + h, left:left + w]
  if flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return image


def image_fns(scale: float, mean, std, augment: str, padding: int):
  """(train map with rng, eval map) for image records -> ``{'image' f32, 'label' i32}``."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)

  def finish(image, label):
    x = (np.asarray(image, np.float32) * scale - mean) / std
    return {"image": x.astype(np.float32), "label": np.int32(label)}

  def train(rec, rng):
    img = rec["image"]
    if augment == "crop_flip":
      img = _augment_crop_flip(img, rng, padding, flip=True)
    elif augment == "crop":
      img = _augment_crop_flip(img, rng, padding, flip=False)
    return finish(img, rec["label"])

  return train, lambda rec: finish(rec["image"], rec["label"])


class Windows:
  """Every ``length``-token window of an int array: ``[i]`` = ``tokens[i : i + length]``."""

  def __init__(self, tokens: np.ndarray, length: int, stride: int = 1):
    self.tokens, self.length, self.stride = tokens, length, stride

  def __len__(self):
    return max(0, (len(self.tokens) - self.length) // self.stride + 1)

  def __getitem__(self, i):
    start = int(i) * self.stride
    return {"tokens": self.tokens[start:start + self.length].astype(np.int32)}


class Pipeline:
  """Train batches and the eval sets (validation, test) of one data set for one process.

  Attributes:
    info: what the model and the loss need to know (task, shapes, classes, vocabulary...).
    local_batch: examples per train batch on this process (global batch / process count).
    eval_split: the eval set that ``eval_batches()``, ``num_eval`` and ``num_eval_batches`` read
      by default: what the run evaluates while it trains.
    eval_splits: the names of the eval sets there are.
  """

  def __init__(self, train: grain.MapDataset, eval_sets: dict[str, Any],
               eval_map: Callable[[Any], dict], *, info: dict, global_batch: int,
               eval_batch: int, process_index: int, process_count: int,
               eval_split: str = "validation", threads: int = 2):
    self.info = info
    self.process_index, self.process_count = process_index, process_count
    self.local_batch = global_batch // process_count
    self._threads = threads
    if self.local_batch == 1:  # grain's batch(1) of a repeated dataset overflows its length
      batched = train.map(lambda rec: jax.tree.map(lambda a: np.asarray(a)[None], rec))
    else:
      batched = train.batch(self.local_batch)
    self._train = batched[process_index::process_count]
    self.eval_batch = eval_batch
    self._local_eval = eval_batch // process_count
    self._eval_map = eval_map
    self._sets = dict(eval_sets)
    self.eval_splits = tuple(self._sets)
    self.eval_split = eval_split

  def num_eval_of(self, split: str | None = None) -> int:
    """Examples in an eval set (the default one with None)."""
    return len(self._sets[split or self.eval_split])

  def num_eval_batches_of(self, split: str | None = None) -> int:
    return -(-self.num_eval_of(split) // self.eval_batch)

  @property
  def num_eval(self) -> int:
    return self.num_eval_of()

  @property
  def num_eval_batches(self) -> int:
    return self.num_eval_batches_of()

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's part of the batch of step ``step`` (random access; for tests)."""
    return self._train[step]

  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches ``start_step, start_step + 1, ...`` read ahead by worker threads."""
    ds = self._train[start_step:]
    opts = grain.ReadOptions(num_threads=self._threads, prefetch_buffer_size=4)
    return iter(ds.to_iter_dataset(opts))

  def eval_batches(self, split: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of every batch of an eval set (the default one with None), padded
    with masked copies of its example 0 to whole global batches (``mask`` = 0 marks padding)."""
    name = split or self.eval_split
    if name not in self._sets:
      raise KeyError(f"no {name!r} eval set; there are {list(self._sets)}")
    records, n = self._sets[name], self.num_eval_of(name)

    def padded(i):
      rec = self._eval_map(records[i if i < n else 0])
      return {**rec, "mask": np.float32(i < n)}

    ev = grain.MapDataset.range(self.num_eval_batches_of(name) * self.eval_batch).map(padded)
    ev = ev.batch(self._local_eval)[self.process_index::self.process_count]
    for i in range(len(ev)):
      yield ev[i]
