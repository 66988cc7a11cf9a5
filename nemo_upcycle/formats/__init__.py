"""Checkpoint formats, no NeMo: dense sources (HF Llama, GGUF; a registry NeMo's reader joins from the engine), the HF
MoE layouts and writers, streaming safetensors, and the one HF <-> Megatron key table."""

from nemo_upcycle.formats import gguf, hf_llama  # noqa: F401, E402 -- register the built-in readers with formats.base
