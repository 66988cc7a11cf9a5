"""The Hydra recipes (YAML): one folder per config group, the top-level files are the recipes."""
