"""Tiny LM / encoder-decoder configs for the parameter-table tool test: ``:lm`` or ``:seq2seq``."""

import ml_collections


def get_config(arg: str = "lm"):
  config = ml_collections.ConfigDict()
  m = config.model = ml_collections.ConfigDict()
  m.name = arg                 # 'lm' | 'seq2seq'
  m.vocab_size = 64
  m.max_len = 16
  m.dim = 32
  m.depth = 4                  # LM layers / encoder layers
  if arg == "seq2seq":
    m.dec_depth = 4
  else:
    m.positions = "rope"
    m.tie_embeddings = True
  m.num_heads = 4
  m.mlp_ratio = 2.0
  m.dropout = 0.0
  m.dtype = "float32"
  m.scan = True
  m.remat = "none"
  v = m.vlora = ml_collections.ConfigDict()
  v.enabled = True
  v.compound_size = 2
  v.rank = 4
  return config
