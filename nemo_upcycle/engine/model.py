"""``UpcycledLlamaModel``: a NeMo 2 GPT model that starts from a dense Llama, and its "upcycle" importer.

Two ways in, one piece of math (``core`` through ``engine.filler.MegatronFiller``):
  * offline: ``llm.import_ckpt(UpcycledLlamaModel(config), "upcycle://<dense>")`` writes a NeMo MoE checkpoint;
  * online:  ``UpcycledLlamaModel(config, upcycle_from="<dense>")`` builds the MoE when training starts
    (``configure_model``): each rank reads the dense tensors it needs, one layer at a time, and builds only its own
    experts and tensor-parallel shards -- never the whole dense model next to the whole MoE, unlike Megatron-LM's
    ``--moe-use-upcycling``. A run that resumes from a checkpoint skips it.
``<dense>`` is anything ``formats.base.open_dense`` opens: an HF Llama directory, a GGUF file, a NeMo 2 checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from nemo.collections.llm.gpt.model.base import GPTModel
from nemo.lightning import io

from nemo_upcycle.core.sources import MultiSourceExperts
from nemo_upcycle.engine import compat, nemo_source, timing  # noqa: F401 -- nemo_source registers the NeMo 2 reader
from nemo_upcycle.engine.calibrate import plan_for
from nemo_upcycle.engine.config import UpcycledLlamaConfig
from nemo_upcycle.engine.cpu import cpu_strategy_kwargs
from nemo_upcycle.engine.filler import MegatronFiller, RankLayout
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats.base import DenseSource, open_dense
from nemo_upcycle.formats.keymap import has_qkv_bias
from nemo_upcycle.formats.sources import SourceSet, open_expert_sources
from nemo_upcycle.planning.layout import ModelDims, ParallelLayout, check_layout

log = logging.getLogger(__name__)
compat.accept_nemo_optimizer_arguments()  # NeMo 2.7 on megatron-core 0.16 (ngc-26.02): engine/compat.py


def check_dense_matches(src: DenseSource, config) -> None:
    """Refuse, in one line, a dense source whose sizes disagree with the MoE config."""
    c = src.config
    H = c["num_attention_heads"]
    pairs = [("num_layers", config.num_layers, c["num_hidden_layers"]),
             ("hidden_size", config.hidden_size, c["hidden_size"]),
             ("ffn_hidden_size", config.ffn_hidden_size, c["intermediate_size"]),
             ("num_attention_heads", config.num_attention_heads, H),
             ("num_query_groups", config.num_query_groups or H, c.get("num_key_value_heads") or H),
             ("kv_channels", config.kv_channels or config.hidden_size // config.num_attention_heads, src.head_dim),
             ("share_embeddings_and_output_weights", bool(config.share_embeddings_and_output_weights), src.tied),
             ("add_qkv_bias", bool(config.add_qkv_bias), has_qkv_bias(c))]
    for name, ours, theirs in pairs:
        if ours != theirs:
            raise UpcycleError(f"the dense source {src.path} has {name}={theirs} but the MoE config says {ours}; "
                               "build the config with UpcycledLlamaConfig.from_dense(...) or fix the recipe.")
    if config.vocab_size is not None and config.vocab_size < c["vocab_size"]:
        raise UpcycleError(f"config vocab_size {config.vocab_size} is smaller than the dense source's "
                           f"{c['vocab_size']}.")


def check_parallel_layout(config, tp: int, ep: int, etp: int = 1, pp: int = 1) -> None:
    """The layout rules (``planning.layout``) between the model and this job's parallel sizes, as one line up front
    instead of an error deep inside Megatron's model construction."""
    dims = ModelDims.from_config(config, vocab_size=config.vocab_size or 1)  # the vocab is in no layout rule
    check_layout(dims, ParallelLayout(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                      expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                                      sequence_parallel=bool(getattr(config, "sequence_parallel", False))))


def rank_layout(module) -> RankLayout:
    from megatron.core import parallel_state as ps

    layers = getattr(getattr(module, "decoder", None), "layers", None)
    offset = layers[0].layer_number - 1 if layers is not None and len(layers) else 0
    return RankLayout(tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
                      ep_rank=ps.get_expert_model_parallel_rank(), ep_size=ps.get_expert_model_parallel_world_size(),
                      etp_rank=ps.get_expert_tensor_parallel_rank(),
                      etp_size=ps.get_expert_tensor_parallel_world_size(),
                      layer_offset=offset)


def upcycle_into(module, config, source, *, progress: bool = True) -> int:
    """Fill a freshly built Megatron MoE module (this rank's shard) from a dense source. Returns elements written."""
    from tqdm.auto import tqdm

    src = source if isinstance(source, DenseSource) else open_dense(source)
    check_dense_matches(src, config)
    opts = config.upcycle_options() if config.num_moe_experts else None  # dense: every weight copied as is
    plan = plan_for(config, src, progress=progress) if opts is not None else None  # splits / routers from data
    sources = SourceSet(src, open_expert_sources(src, opts.expert_sources) if opts else [],
                        opts.non_expert if opts else "base")  # several dense sources: checked up front
    experts = MultiSourceExperts(sources.mlp_readers(), opts, plan=plan) if sources.experts else None
    layout = rank_layout(module)
    E = config.num_moe_experts or 1
    filler = MegatronFiller(sources.get, src.config, opts, layout, num_local_experts=E // layout.ep_size,
                            padded_vocab=config.vocab_size, plan=plan, experts=experts)
    params = list(module.named_parameters())
    with tqdm(total=sum(p.numel() for _, p in params), unit="param", unit_scale=True, desc="online upcycle",
              disable=not progress) as bar:
        n = filler.fill(params, bar.update)
    log.info("upcycled %s into EP rank %d/%d, TP rank %d/%d: %.1fM parameters", src.path, layout.ep_rank,
             layout.ep_size, layout.tp_rank, layout.tp_size, n / 1e6)
    return n


class UpcycledLlamaModel(GPTModel):
    """A NeMo GPT model for upcycled Llama MoEs; ``upcycle_from`` makes the MoE from a dense source at start."""

    def __init__(self, config: UpcycledLlamaConfig, optim=None, tokenizer=None, model_transform=None,
                 upcycle_from: Optional[str] = None):
        super().__init__(config, optim=optim, tokenizer=tokenizer, model_transform=model_transform)
        self.upcycle_from = upcycle_from

    def configure_model(self, vp_stage: Optional[int] = None) -> None:
        from megatron.core import parallel_state as ps

        fresh = not hasattr(self, "module")
        if fresh and ps.model_parallel_is_initialized():
            check_parallel_layout(self.config, ps.get_tensor_model_parallel_world_size(),
                                  ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size(),
                                  ps.get_pipeline_model_parallel_world_size())
        if fresh:
            timing.mark("model_build_start")
        super().configure_model(vp_stage)
        if fresh and self.upcycle_from and not self._resuming():
            upcycle_into(self.module, self.config, self.upcycle_from)
            timing.mark("upcycled")

    def _resuming(self) -> bool:
        trainer = getattr(self, "_trainer", None)
        return bool(trainer is not None and getattr(trainer, "ckpt_path", None))

    def importer(self, path: str) -> io.ModelConnector:  # noqa: D401 -- instance method on purpose
        """The registered connector for ``path``, given this model's MoE config (NeMo passes only the class)."""
        connector = type(self)._get_connector(path, importer=True)
        connector.target_config = self.config
        return connector


@io.model_importer(UpcycledLlamaModel, "upcycle")
class DenseToMoEImporter(io.ModelConnector["DenseLlama", UpcycledLlamaModel]):
    """``upcycle://<HF Llama dir | .gguf>`` -> a NeMo 2 MoE checkpoint (offline upcycling)."""

    target_config: Optional[UpcycledLlamaConfig] = None

    def init(self) -> UpcycledLlamaModel:
        return UpcycledLlamaModel(self.config)

    @property
    def source(self) -> DenseSource:
        if not hasattr(self, "_source"):
            self._source = open_dense(Path(str(self)))
        return self._source

    @property
    def config(self) -> UpcycledLlamaConfig:
        if self.target_config is not None:
            return self.target_config
        return UpcycledLlamaConfig.from_dense(self.source.config)  # E8 top-2 defaults

    def apply(self, output_path: Path) -> Path:
        from nemo.lightning.base import teardown

        src = self.source
        check_dense_matches(src, self.config)
        target = self.init()
        strategy_kwargs = {} if torch.cuda.is_available() else cpu_strategy_kwargs()  # synchronous save on CPU
        trainer = self.nemo_setup(target, **strategy_kwargs)
        upcycle_into(target.module, target.config, src)
        self.nemo_save(output_path, trainer)
        teardown(trainer, target)
        return output_path

    def on_import_ckpt(self, model) -> None:  # the tokenizer travels with the data recipe (training issue)
        return None


def megatron_forward_logits(module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of a Megatron GPT module for ids [B, T], with an explicit causal mask (True = masked)."""
    B, T = input_ids.shape
    position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0).expand(B, T)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=input_ids.device), diagonal=1)[None, None]
    with torch.no_grad():
        return module(input_ids=input_ids, position_ids=position_ids, attention_mask=mask)
