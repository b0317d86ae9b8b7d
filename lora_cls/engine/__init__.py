"""Training and evaluation on tensors: the Trainer, evaluation, optimizer, EMA, loss, timing, device and processes. Knows modules and tensors, not files (docs/DESIGN.md §2)."""
