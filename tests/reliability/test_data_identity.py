"""Data identity wherever two runs meet (issue 29, class 2): a resume, ``restore_from``, an
``init_from`` source (``compress:``, ``checkpoint:``), a teacher, and ``evaluate`` on other data.

Data whose ids or pixels mean something else (another character set at the same vocabulary size, a
vocabulary that grew, other class names, another normalisation) are refused in set-up, before
anything compiles, with the fields that differ; data that mean the same (a moved copy of the file,
another text over the same characters) are accepted.
"""

from __future__ import annotations

import shutil

import pytest
from helpers_runs import TEXT, other_charset, stored_run, write_images, write_text
from helpers_train import tiny

from vlora_jax.errors import UserError
from vlora_jax.train.setup import set_up


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("identity")
  text = write_text(tmp / "a" / "text.txt", TEXT)
  images = write_images(tmp / "a" / "images.npz")
  return {
      "tmp": tmp, "text": text, "images": images,
      "moved_text": shutil.copy(text, write_text(tmp / "b" / "moved.txt", "")),
      "other_chars": write_text(tmp / "other.txt", other_charset(TEXT)),
      "grown": write_text(tmp / "grown.txt", TEXT + "Z"),
      "same_chars": write_text(tmp / "same.txt", TEXT[::-1]),
      "moved_images": shutil.copy(images, tmp / "b" / "moved.npz"),
      "renamed_classes": write_images(tmp / "renamed.npz", names=("c", "a", "b")),
  }


def _lm(path, **overrides):
  return tiny("lm", **{"data.path": str(path), **overrides})


def _vit(path, **overrides):
  return tiny("vit", **{"data.source": "npz", "data.path": str(path), "model.num_classes": 3,
                        **overrides})


@pytest.fixture(scope="module")
def runs(data):
  tmp = data["tmp"]
  return {
      "lm": stored_run(tmp / "lm", _lm(data["text"])),
      "dense_lm": stored_run(tmp / "dense_lm", _lm(data["text"], **{"model.vlora.enabled": False})),
      "dense_lm_other": stored_run(tmp / "dense_lm_other",
                                   _lm(data["other_chars"], **{"model.vlora.enabled": False})),
      "vit": stored_run(tmp / "vit", _vit(data["images"])),
      "dense_vit_renamed": stored_run(tmp / "dense_vit_renamed",
                                      _vit(data["renamed_classes"],
                                           **{"model.vlora.enabled": False})),
      "dense_vit_normalised": stored_run(tmp / "dense_vit_normalised",
                                         _vit(data["images"], **{"model.vlora.enabled": False,
                                                                 "data.mean": (0.3,)})),
  }


def _resume(run, config, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(run, workdir)
  return set_up(config, workdir)


REFUSED_RESUMES = [  # (run, data key, overrides, the field named)
    ("lm", "other_chars", {}, "vocab"),
    ("lm", "grown", {}, "vocab"),
    ("vit", "renamed_classes", {}, "class_names"),
    ("vit", "images", {"data.mean": (0.4,)}, "mean"),
    ("vit", "images", {"data.std": (0.25,)}, "std"),
]


@pytest.mark.parametrize("run, key, overrides, field", REFUSED_RESUMES)
def test_a_resume_on_data_that_mean_something_else_is_refused(run, key, overrides, field, data,
                                                              runs, tmp_path):
  config = (_lm if run == "lm" else _vit)(data[key], **overrides)
  with pytest.raises(UserError, match=rf"the data differ in what ids or pixels mean: {field}: ") \
      as e:
    _resume(runs[run], config, tmp_path)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("run, key", [("lm", "moved_text"), ("lm", "same_chars"),
                                      ("vit", "moved_images")])
def test_a_resume_on_data_that_mean_the_same_is_accepted(run, key, data, runs, tmp_path):
  config = (_lm if run == "lm" else _vit)(data[key])
  assert _resume(runs[run], config, tmp_path).pipe.info["kind"] in ("text", "images")


@pytest.mark.parametrize("how", ["compress", "checkpoint", "restore_from", "teacher"])
def test_a_source_run_on_other_characters_is_refused(how, data, runs, tmp_path):
  source = str(runs["dense_lm_other"])
  overrides = {"compress": {"init_from": f"compress:{source}"},
               "checkpoint": {"init_from": f"checkpoint:{source}",
                              "model.vlora.enabled": False},
               "restore_from": {"checkpoint.restore_from": source, "model.vlora.enabled": False},
               "teacher": {"distill.teacher": source}}[how]
  with pytest.raises(UserError, match="the data differ in what ids or pixels mean: vocab"):
    set_up(_lm(data["text"], **overrides), tmp_path / "student")


@pytest.mark.parametrize("how", ["compress", "teacher"])
def test_a_source_run_on_the_same_characters_is_accepted(how, data, runs, tmp_path):
  source = str(runs["dense_lm"])
  overrides = ({"init_from": f"compress:{source}"} if how == "compress"
               else {"distill.teacher": source})
  assert set_up(_lm(data["moved_text"], **overrides), tmp_path / "student") is not None


@pytest.mark.parametrize("source, field", [("dense_vit_renamed", "class_names"),
                                           ("dense_vit_normalised", "mean")])
@pytest.mark.parametrize("how", ["compress", "teacher"])
def test_an_image_source_that_means_other_pixels_or_classes_is_refused(source, field, how, data,
                                                                       runs, tmp_path):
  arg = str(runs[source])
  overrides = {"init_from": f"compress:{arg}"} if how == "compress" else {"distill.teacher": arg}
  with pytest.raises(UserError, match=f"mean: {field}: "):
    set_up(_vit(data["images"], **overrides), tmp_path / "student")


@pytest.mark.parametrize("run, overrides, field", [
    ("lm", {"data.path": "other_chars"}, "vocab"),
    ("lm", {"data.path": "grown"}, "vocab"),
    ("vit", {"data.path": "renamed_classes"}, "class_names"),
    ("vit", {"data.mean": (0.2,)}, "mean"),
])
def test_evaluate_on_data_that_mean_something_else_is_refused(run, overrides, field, data, runs,
                                                              tmp_path):
  from vlora_jax.evaluate import evaluate
  overrides = {k: str(data[v]) if k == "data.path" else v for k, v in overrides.items()}
  with pytest.raises(UserError, match=field):
    evaluate(runs[run], overrides=overrides, out=tmp_path / "e.json")
  assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("run, key", [("lm", "moved_text"), ("vit", "moved_images")])
def test_evaluate_on_a_moved_copy_is_accepted(run, key, data, runs, tmp_path):
  from vlora_jax.evaluate import evaluate
  result = evaluate(runs[run], overrides={"data.path": str(data[key])}, out=tmp_path / "e.json")
  assert result["step"] == 2 and (tmp_path / "e.json").exists()
