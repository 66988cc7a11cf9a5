"""The adapter package: the only place that imports NeMo and Megatron-core."""
