"""Classifiers by name: the registry, building a model with its weights and new head, fine-tune modes, and the meta-device checks of a config (docs/DESIGN.md §4)."""
