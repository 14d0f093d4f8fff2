"""Parameter table of a config's model: dense vs VLoRA counts by group, and the ratio.

  vlora-params --config configs/vit_cifar10.py
  vlora-params --config configs/vit_cifar10.py --config.model.vlora.rank=4,4,2,2

(``python -m vlora_jax.tools.params`` is the same command.)

Builds ``vlora_jax.models.build(config.model)`` and counts parameters from shapes only
(``jax.eval_shape``: nothing is allocated or compiled), for the model and for its dense twin (the same
architecture with every stack dense). With the official choices and the CIFAR config (img 32,
patch 4, D 192, 3 heads, 3 compounds x 4, rank 8, 10 classes) it prints VLoRA 1,602,634 and dense
5,362,762.
"""

from __future__ import annotations

from vlora_jax import cli, models
from vlora_jax.core import params


def describe(mcfg) -> str:
  """The table for ``config.model`` as text: groups, totals, bytes, ratio and a summary line."""
  model = models.build(mcfg)
  t = params.table(model, *models.sample_inputs(mcfg))
  m, d = t["model"]["total"], t["dense"]["total"]
  spec = getattr(model, "vlora", None)
  lines = [f"model: {mcfg.name}", params.format_table(t), ""]
  if spec is None:
    lines.append(f"dense model: {d:,} parameters (VLoRA disabled)")
  else:
    # Models whose stacks differ (encoder / decoder) say so per stack.
    for name, (s, _) in model.stack_specs().items():
      ranks = s.rank if isinstance(s.rank, int) else list(s.rank)
      lines.append(f"VLoRA {name}: {s.mode}, compound size {s.compound_size}, rank {ranks}, "
                   f"targets {list(s.targets)}")
    lines.append(f"VLoRA {m:,} vs dense {d:,}: ratio {t['ratio']:.4f} "
                 f"({100 * (1 - t['ratio']):.1f}% fewer parameters)")
  return "\n".join(lines)


def parser() -> cli.Parser:
  p = cli.Parser("vlora-params", __doc__, epilog=cli.OVERRIDES_HELP, allow_abbrev=False)
  cli.add_config_arg(p, "the model")
  p.add_argument("--verbose", action="store_true", help="show the traceback of input errors too")
  return cli.with_overrides_usage(p)


def main(argv: list[str] | None = None) -> None:
  args, config = cli.parse_config_command(parser(), argv)
  if "model" not in config:
    cli.fail(f"--config={args.config!r}: the config has no 'model' field")
  try:
    text = describe(config.model)
  except ValueError as e:  # a bad config: the message names the key; no traceback needed
    cli.fail(cli.one_line(e), e, args.verbose)
  print(text)


def run():
  """The ``vlora-params`` console script."""
  main()


if __name__ == "__main__":
  run()
