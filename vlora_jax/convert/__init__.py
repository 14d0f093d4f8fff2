"""Maps into VLoRA parameterisations: PyTorch import (`torch_vit`), dense -> VLoRA (`compress`)."""

from vlora_jax.convert.compress import Compressed, compress, compress_tree
from vlora_jax.convert.torch_vit import torch_vit

__all__ = ["Compressed", "compress", "compress_tree", "torch_vit"]
