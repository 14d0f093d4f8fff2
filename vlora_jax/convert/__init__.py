"""Maps into VLoRA parameterisations: PyTorch import (`torch_vit`), dense -> VLoRA (`compress`),
pretrained Llamas from GGUF files and Hugging Face directories (`pretrained`, `gguf_llama`,
`hf_llama`; ``python -m vlora_jax.convert``); and out of them: a merged dense ViT to timm
(`timm_export`) and a Llama to Hugging Face (`hf_llama`), used by `vlora_jax.export`."""

from vlora_jax.convert.compress import Compressed, compress, compress_tree
from vlora_jax.convert.torch_vit import torch_vit

__all__ = ["Compressed", "compress", "compress_tree", "torch_vit"]
