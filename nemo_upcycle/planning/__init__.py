"""Planning without a GPU: layout rules, parameter / memory counts, FLOPs per token and MFU (one formula)."""
