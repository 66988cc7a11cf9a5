"""Applications on top of the library: the CLI, the Hydra entry point and its modes, compare, catalog, report."""
