"""The run folder and what is written into it: files, checkpoints, resume state, reports, plots, console tables, the sweep summary and experiment loggers (docs/DESIGN.md §6, §7)."""
