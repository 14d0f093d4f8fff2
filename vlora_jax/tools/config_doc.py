"""``python -m vlora_jax.tools.config_doc [--write]``: the config schema as markdown.

Prints the table; ``--write`` puts it into docs/config.md in place of the table there (the prose
above it stays).
"""

import sys
from pathlib import Path

from vlora_jax.train import schema

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def write(doc: Path = DOC) -> None:
  text = doc.read_text()
  head = text[:text.index("| key | allowed |")]
  doc.write_text(head + schema.markdown())


if __name__ == "__main__":
  if "--write" in sys.argv[1:]:
    write()
  else:
    print(schema.markdown(), end="")
