"""The model runtime: loading (model, processor, LoRA adapters), the local and remote backends, the tiny
model builder."""
