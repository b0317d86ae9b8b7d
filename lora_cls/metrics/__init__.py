"""The numbers a run reports: classification metrics as plain Python values (docs/DESIGN.md §6)."""
