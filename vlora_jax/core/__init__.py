"""The core: VLoRA itself and the blocks it stacks, pure JAX/Flax (no training, data or files).

A VLoRA model is a dense model whose layer stack is parameterised differently. Read in this order:

  spec.py          what a VLoRA parameterisation is (`VLoRASpec`: compounds, targets, ranks, mode)
                   and how it lays out one block's parameters (`Layout`)
  chain.py         the math: stacked low-rank factors -> per-layer weights (cumulative, anchored,
                   tied, relaxed); pure JAX, no Flax
  stack.py         `vlorafy`: any Flax block -> one scan over its layers, dense or VLoRA
                   (`LayerStack`, `to_dense`, the KV cache when decoding)
  layers.py        attention, MLP, encoder and decoder blocks, written once for every model
  lora.py          horizontal LoRA adapters on any stack (`LoRASpec`), merging and adapter files
  params.py        counting parameters by group, selecting them by path, the dense twin
  remat.py         the named rematerialisation policies and the activations blocks tag for them
  partitioning.py  logical axis names -> mesh shardings, for parameters and activations

Everything else builds on these: the model families (`vlora_jax.models`), training
(`vlora_jax.train`), conversion (`vlora_jax.convert`) and the commands.
"""
