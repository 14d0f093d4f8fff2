"""A ViT with 4 register tokens on the bundled 8x8 digits: `configs/vit_digits.py` plus registers.

The family (`vlora_jax/models/vit_registers.py`) is the example of adding a model: one file under
``models/`` and this config. Same ``arg`` as `configs/vit_digits.py`, plus ``n=<registers>``:

  vlora-train --config configs/vit_registers_digits.py --workdir runs/vit_registers

Its splits are `configs/vit_digits.py`'s (validation: 144 of the 1,438 train images). Expected:
under a minute on 2 CPU cores (measured on 2 shared cores when the model trained on all 1,438
images and was chosen on the test split: 98.33% test accuracy in 37 s, 79,562 parameters;
experiments/results/main_job/vit_registers_summary.json).
"""

from configs import default, vit_digits


def get_config(arg: str = "vlora"):
  a = default.parse_arg(arg, {"variant": ("vlora", ("vlora", "dense")), "r": 8, "s": 4,
                              "steps": 1000, "n": 4})
  c = vit_digits.get_config(",".join(f"{k}={v}" if k != "variant" else v
                                     for k, v in a.items() if k != "n"))
  c.model.name = "vit_registers"
  c.model.num_registers = a["n"]  # learned tokens after the patches, dropped at the output
  c.optim.wd_mults = ((r"(.*/)?(bias|scale|pos_embed|cls_token|registers)", 0.0),)
  return c
