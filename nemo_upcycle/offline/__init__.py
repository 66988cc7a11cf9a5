"""Offline upcycling without NeMo: dense checkpoint -> HF MoE directory (``convert``) and its check with transformers
(``verify``)."""
