"""Maps into VLoRA parameterisations: PyTorch import (`torch_vit`), dense -> VLoRA (`compress`)."""

from vlora_jax.convert.torch_vit import torch_vit

__all__ = ["torch_vit"]
