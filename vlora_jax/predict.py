"""Classify image files with a trained ViT run: the top classes of each, with their probabilities.

  vlora-predict --workdir DIR [--step N|best] [--top K] [--verbose] FILE...

(``python -m vlora_jax.predict`` is the same command.)

For the image classifiers (``model.name`` in 'vit', 'vit_registers'). The model and the data's
description come from the checkpoint (`vlora_jax.load`): no data file is read.

Files, and how their pixels are read:

  PNG, JPEG   (or another 8-bit image Pillow opens) pixels 0-255: grey images as one channel,
              any other as RGB (alpha dropped).
  .npy        an H x W or H x W x C array (C 1 or 3): uint8 is pixels 0-255, as an image file's;
              any other integer or float array holds pixels as the run's data set holds them, on
              its pixel scale (pixels * info['scale'] in [0, 1]: 0-255 under
              ``data.pixel_scale='uint8'`` and for TFDS images, [0, 1] under 'unit', 0-16 for the
              digits). So a record of the run's own data, saved with ``np.save``, reads as the
              run read it. Values off that scale, or NaN, are refused.

Then, as training prepares its images (`vlora_jax.data`): the channels the run needs (grey to RGB
by repeating it, RGB to grey by ITU-R 601-2 luma, as Pillow's ``convert('L')``), a bilinear resize
to the run's image size when the size differs, and the run's normalisation, ``(pixels * scale -
mean) / std`` (the eval pipeline's own function). The files go through the model in batches of up
to ``eval_batch_size``, one jitted forward pass per batch; probabilities are the softmax of the
logits.

Prints, per file, its path and then K lines ``probability  class`` (the class names the data set
gave, else the class ids), most probable first.

Exit status: 0 done; 2 a mistake in the input (no checkpoint in the workdir, a bad ``--step``, a run
that is not an image classifier, a file that is missing, does not read, or has a shape or pixels
that are not allowed), one line ``error: ...``; 130 / 143 interrupted by Ctrl-C / SIGTERM; 1 an
internal error.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from vlora_jax import cli, models
from vlora_jax.runs import trained as trained_lib
from vlora_jax.errors import UserError

PROG = "vlora-predict"

LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2 (Pillow's convert('L'))
IMAGE_RULE = ("allowed: a PNG or JPEG image (8-bit), or a .npy array H x W or H x W x C (C 1 or 3) "
              "of uint8 pixels 0-255 or of numbers on the run's pixel scale")


class PredictError(UserError, ValueError):
  """A run that predict does not serve, or a file it cannot read."""


def _check_family(meta: dict, step_dir: Path) -> None:
  name = meta.get("config", {}).get("model", {}).get("name")
  if name not in models.FAMILIES or not models.family(name).classifies_images:
    serves = sorted(n for n, f in models.FAMILIES.items() if f.classifies_images)
    raise PredictError(f"the run's model.name={name!r} is not an image classifier; predict serves "
                       f"model.name in {serves} (checkpoint {step_dir})")


def _check_info(info: dict, step_dir: Path) -> None:
  missing = [k for k in ("image_shape", "scale", "mean", "std") if k not in info]
  if missing:
    raise PredictError(f"checkpoint {step_dir} stores no {missing} in its data info (written "
                       "before the data's description was stored with the model): predict needs "
                       "the image size and normalisation")


def _scale_text(scale: float) -> str:
  return f"pixels * {scale:g} in [0, 1], i.e. 0-{1 / scale:g}"


def _read_npy(path: Path, info: dict) -> tuple[np.ndarray, float]:
  try:
    a = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise PredictError(f"{path}: does not read as a .npy array ({type(e).__name__}: "
                       f"{cli.one_line(e)}); {IMAGE_RULE}") from None
  if not isinstance(a, np.ndarray) or a.dtype.kind not in "iuf":
    raise PredictError(f"{path}: dtype {getattr(a, 'dtype', type(a).__name__)}; {IMAGE_RULE}")
  if a.ndim not in (2, 3) or 0 in a.shape:
    raise PredictError(f"{path}: shape {a.shape}; {IMAGE_RULE}")
  if a.dtype == np.uint8:
    return a, 1.0 / 255.0
  scale = float(info["scale"])
  rule = f"{a.dtype} pixels on the run's pixel scale ({_scale_text(scale)})"
  if not np.isfinite(a).all():
    raise PredictError(f"{path}: {int((~np.isfinite(a)).sum())} NaN/inf values; allowed: {rule}")
  lo, hi = float(a.min()) * scale, float(a.max()) * scale
  if lo < -1e-6 or hi > 1 + 1e-6:
    raise PredictError(f"{path}: values {a.min():g} to {a.max():g}; allowed: {rule} (or uint8 "
                       "pixels 0-255)")
  if math.isclose(scale, 1 / 255) and a.dtype.kind == "f" and (a != np.floor(a)).any():
    hint = " (these look like [0, 1] floats: multiply by 255)" if hi <= 1 / 255 + 1e-6 else ""
    raise PredictError(f"{path}: fractional values; allowed: whole numbers 0-255, as the run's "
                       f"data (pixel scale 1/255){hint}")
  return a, scale


def _read_image(path: Path) -> tuple[np.ndarray, float]:
  try:
    from PIL import Image, UnidentifiedImageError
  except ImportError:
    raise PredictError(f"{path}: image files are read with Pillow, which is not installed "
                       "(pip install pillow); a .npy array of the model's size needs none"
                       ) from None
  try:
    with Image.open(path) as img:
      img.load()
      if img.mode not in ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                          "YCbCr", "LAB", "HSV"):
        raise PredictError(f"{path}: a {img.format} image of mode {img.mode!r} (16-bit or float "
                           f"pixels); {IMAGE_RULE}")
      grey = img.mode in ("1", "L", "LA", "La")
      pixels = np.asarray(img.convert("L" if grey else "RGB"))
  except UnidentifiedImageError:
    raise PredictError(f"{path}: not an image that Pillow reads; {IMAGE_RULE}") from None
  except OSError as e:  # missing, unreadable, a directory, a truncated image
    raise PredictError(f"{path}: cannot read it ({e.strerror or cli.one_line(e)}); "
                       f"{IMAGE_RULE}") from None
  return pixels, 1.0 / 255.0


def read_pixels(path, info: dict) -> tuple[np.ndarray, float]:
  """A file's pixels ``[h, w, c]``, as stored, and the factor that maps them onto [0, 1]
  (``1/255`` for uint8 and image files, else the run's ``info['scale']``); see the module doc."""
  path = Path(path)
  if path.suffix.lower() == ".npy":
    if not path.is_file():
      raise PredictError(f"{path}: no such file; {IMAGE_RULE}")
    pixels, factor = _read_npy(path, info)
  else:
    pixels, factor = _read_image(path)
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  return pixels, factor


def _channels(pixels: np.ndarray, c: int, path) -> np.ndarray:
  have = pixels.shape[-1]
  if have == c:
    return pixels
  if have == 1 and c == 3:
    return np.repeat(pixels, 3, axis=-1)
  if have == 3 and c == 1:
    return (pixels.astype(np.float32) @ LUMA)[..., None]
  allowed = sorted({1, 3, c}) if c in (1, 3) else [c]
  raise PredictError(f"{path}: {have} channels (shape {pixels.shape}); the run's images have {c}: "
                     f"allowed are {allowed} channels")


def _resize(pixels: np.ndarray, h: int, w: int) -> np.ndarray:
  """Bilinear (antialiased when shrinking), per channel, in float: the pixels' scale stays."""
  try:
    from PIL import Image
  except ImportError:
    raise PredictError(f"an input of {pixels.shape[0]}x{pixels.shape[1]} must be resized to the "
                       f"model's {h}x{w}, which needs Pillow, not installed (pip install pillow)"
                       ) from None
  x = pixels.astype(np.float32)
  return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(x[..., i]))  # mode 'F'
                              .resize((w, h), Image.Resampling.BILINEAR))
                   for i in range(x.shape[-1])], axis=-1)


def prepare(pixels: np.ndarray, factor: float, info: dict, path="") -> np.ndarray:
  """Pixels ``[h, w, c]`` on the scale ``factor`` -> the model's input ``[H, W, C]`` float32:
  the run's channels and size, then the eval pipeline's normalisation."""
  from vlora_jax.data.pipeline import image_fns
  h, w, c = (int(s) for s in info["image_shape"])
  pixels = _channels(pixels, c, path)
  if pixels.shape[:2] != (h, w):
    pixels = _resize(pixels, h, w)
  _, finish = image_fns(factor, info["mean"], info["std"], "none", 0)
  return finish({"image": pixels, "label": 0})["image"]


def load_image(path, info: dict) -> np.ndarray:
  """A file -> the model's input for it (`read_pixels`, then `prepare`)."""
  pixels, factor = read_pixels(path, info)
  return prepare(pixels, factor, info, path)


def _class_name(i: int, names) -> str:
  return str(names[i]) if names and i < len(names) else str(i)


def predict(workdir, files, step: int | str | None = None, top: int = 5,
            batch_size: int | None = None, progress: bool = False) -> list[dict]:
  """The top ``top`` classes of each file: ``[{'file', 'probs' (all classes), 'top': [(class id,
  name, probability), ...]}]``, in the order of ``files``.

  The workdir, the step, the family and every file are checked before the model is loaded.
  """
  if isinstance(top, bool) or not isinstance(top, int) or top < 1:
    raise PredictError(f"--top={top!r}: allowed are whole numbers >= 1")
  if not files:
    raise PredictError("no files given: name one or more PNG, JPEG or .npy files")
  empty = next((f for f in files if not str(f).strip()), None)
  if empty is not None:
    raise PredictError(f"FILE={str(empty)!r}: empty; name PNG, JPEG or .npy files")
  files = [Path(f) for f in files]
  step_dir, resolved, meta = trained_lib.open_checkpoint(workdir, step)
  _check_family(meta, step_dir)
  info = meta.get("data") or {}
  _check_info(info, step_dir)
  images = [load_image(f, info) for f in files]

  # JAX and the model only now: the checks above are instant.
  import jax
  import jax.numpy as jnp
  from vlora_jax import models

  run = trained_lib.load(workdir, step)
  fam = models.family(run.config.model.name)
  model = run.model

  @jax.jit
  def probabilities(params, x):
    logits = model.apply({"params": params}, *fam.inputs({"image": x}), train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  params = jax.device_put(run.params)
  b = min(len(images), int(batch_size or run.config.eval_batch_size))
  from vlora_jax.train import metrics as metrics_lib
  bar = metrics_lib.Progress(-(-len(images) // b), 0, enabled=progress, unit="batch",
                             desc="predict")
  probs = []
  for i in range(0, len(images), b):
    chunk = np.stack(images[i:i + b])
    n = len(chunk)
    if n < b:  # one shape, one compile: the last batch is padded, the padding dropped
      chunk = np.concatenate([chunk, np.zeros((b - n, *chunk.shape[1:]), chunk.dtype)])
    probs.extend(np.asarray(probabilities(params, chunk))[:n])
    bar.update(1)
  bar.close()
  names = run.info.get("class_names")
  out = []
  for f, p in zip(files, probs):
    order = np.argsort(-p, kind="stable")[:top]
    out.append({"file": str(f), "probs": p,
                "top": [(int(k), _class_name(int(k), names), float(p[k])) for k in order]})
  return out


def report(predictions: list[dict]) -> str:
  """What the command prints: per file its path, then ``probability  class`` lines."""
  lines = []
  for pred in predictions:
    lines.append(pred["file"])
    lines += [f"  {prob:.4f}  {name}" for _, name, prob in pred["top"]]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = cli.Parser(PROG, __doc__, allow_abbrev=False)
  cli.add_run_args(parser)
  parser.add_argument("--top", type=int, default=5, help="classes shown per file (default 5)")
  parser.add_argument("files", nargs="+", metavar="FILE", help="PNG, JPEG or .npy files")
  args = parser.parse_args(argv)
  step = cli.step(args.step)
  predictions = cli.guarded(PROG, args.verbose, predict, args.workdir, args.files,
                            step, args.top, progress=sys.stderr.isatty())
  print(report(predictions), flush=True)


if __name__ == "__main__":
  main()
