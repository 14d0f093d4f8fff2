"""grain pipelines: records -> per-process batches, batch ``t`` a pure function of (seed, t).

Train: ``source -> shuffle(seed) -> repeat -> per-example map (augment with a per-index RNG) ->
batch(local) -> every process_count-th batch from process_index``. The global batch at step ``t`` is
examples ``[t*B, (t+1)*B)`` of the shuffled, repeated stream (grain reshuffles every epoch from the
seed and the epoch number); process ``p`` reads only its contiguous slice ``p*b .. (p+1)*b``. So the
data position is the step: a resumed run, or one with another process count, sees exactly the
batches it would have seen.

Eval: the split in order, padded with masked copies of example 0 to a whole number of global
batches, each process reading its own slice of every batch.
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
  """Train and eval batches of one data set for one process.

  Attributes:
    info: what the model and the loss need to know (task, shapes, classes, vocabulary...).
    local_batch: examples per train batch on this process (global batch / process count).
  """

  def __init__(self, train: grain.MapDataset, eval_records, eval_map: Callable[[Any], dict],
               *, info: dict, global_batch: int, eval_batch: int, process_index: int,
               process_count: int, threads: int = 2):
    self.info = info
    self.process_index, self.process_count = process_index, process_count
    self.local_batch = global_batch // process_count
    self._threads = threads
    if self.local_batch == 1:  # grain's batch(1) of a repeated dataset overflows its length
      batched = train.map(lambda rec: jax.tree.map(lambda a: np.asarray(a)[None], rec))
    else:
      batched = train.batch(self.local_batch)
    self._train = batched[process_index::process_count]
    n = len(eval_records)
    self.num_eval = n
    self.eval_batch = eval_batch
    self.num_eval_batches = -(-n // eval_batch)
    self._local_eval = eval_batch // process_count

    def padded(i):
      rec = eval_map(eval_records[i if i < n else 0])
      return {**rec, "mask": np.float32(i < n)}

    ev = grain.MapDataset.range(self.num_eval_batches * eval_batch).map(padded)
    self._eval = ev.batch(self._local_eval)[process_index::process_count]

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's part of the batch of step ``step`` (random access; for tests)."""
    return self._train[step]

  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches ``start_step, start_step + 1, ...`` read ahead by worker threads."""
    ds = self._train[start_step:]
    opts = grain.ReadOptions(num_threads=self._threads, prefetch_buffer_size=4)
    return iter(ds.to_iter_dataset(opts))

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of every eval batch (``mask`` = 0 marks padding)."""
    for i in range(len(self._eval)):
      yield self._eval[i]
