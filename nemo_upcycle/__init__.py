"""nemo-upcycle: turn a dense Llama checkpoint into a Mixture-of-Experts and keep training it.

Sub-packages:
  core/  the upcycling math on plain tensors (pure PyTorch, no NeMo import).
  hf/    streaming readers (HF Llama directory, GGUF) and the HF Mixtral writer.
The CLI is ``nemo-upcycle`` (``nemo_upcycle.apps.cli``).
"""

__version__ = "0.1.0"
