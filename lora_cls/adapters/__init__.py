"""The LoRA math: one adapted layer, the fused convolution, attention, putting adapters into a model, their options and the decay schedule (docs/DESIGN.md §3)."""
