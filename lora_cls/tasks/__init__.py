"""One module per command (train, evaluate, predict, export, compare, search, data check), the wiring from a config to the objects a run needs (build), and the one inference path (inference)."""
