"""Hugging Face I/O: dense Llama readers (HF directory, GGUF) and the Mixtral writer."""
