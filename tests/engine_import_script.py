"""Run by tests/test_engine_import.py in a fresh process (NeMo trainers own the process group).

Builds, from one tiny dense HF Llama: (a) the offline NeMo MoE checkpoint (``llm.import_ckpt`` with the
``upcycle://`` connector), (b) the online start (``UpcycledLlamaModel(upcycle_from=...)`` set up by a NeMo
trainer, saved), (c) a dense NeMo 2 checkpoint made by NeMo's own HF Llama importer, read back by
``NeMoDenseSource`` and upcycled offline. Prints one JSON line with the comparisons.
"""

import json
import sys
from pathlib import Path


def read_ckpt(path: Path) -> dict:
    import torch
    from torch.distributed.checkpoint import FileSystemReader, load

    reader = FileSystemReader(str(path / "weights"))
    meta = reader.read_metadata().state_dict_metadata
    sd = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items() if hasattr(m, "size")}
    load(sd, storage_reader=reader, no_dist=True)
    return sd


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def online_checkpoint(cfg, dense: Path, out: Path) -> None:
    from lightning.pytorch.trainer.states import TrainerFn
    from nemo.lightning import MegatronStrategy, Trainer
    from nemo.lightning.base import teardown
    from nemo.lightning.io.connector import ModelConnector

    from nemo_upcycle.engine.cpu import cpu_strategy_kwargs
    from nemo_upcycle.engine.model import UpcycledLlamaModel

    model = UpcycledLlamaModel(cfg, upcycle_from=str(dense))
    trainer = Trainer(devices=1, accelerator="cpu",
                      strategy=MegatronStrategy(ckpt_save_optimizer=False, **cpu_strategy_kwargs()))
    trainer.state.fn = TrainerFn.FITTING
    trainer.strategy.connect(model)
    trainer.strategy.setup_environment()
    model.configure_model()  # the online upcycle happens here
    ModelConnector.nemo_save(None, out, trainer)
    teardown(trainer, model)


def main(work: Path) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import make_llama
    from nemo_upcycle.engine.cpu import cpu_config_overrides, cpu_strategy_kwargs, enable_cpu_support

    enable_cpu_support()
    from nemo.collections import llm

    from nemo_upcycle.engine.config import UpcycledLlamaConfig
    from nemo_upcycle.engine.model import UpcycledLlamaModel
    from nemo_upcycle.formats.base import open_dense

    dense = make_llama(work / "dense")
    hf = open_dense(dense)
    moe = dict(num_moe_experts=4, moe_router_topk=2, upcycle_granularity=2, params_dtype=torch.float32,
               **cpu_config_overrides())
    cfg = UpcycledLlamaConfig.from_dense(hf.config, **moe)
    offline = llm.import_ckpt(UpcycledLlamaModel(cfg), f"upcycle://{dense}", output_path=work / "offline")
    online_checkpoint(UpcycledLlamaConfig.from_dense(hf.config, **moe), dense, work / "online")
    a, b = read_ckpt(offline), read_ckpt(work / "online")
    res = {"offline_vs_online": max_diff(a, b), "num_tensors": len(a),
           "expert_keys": sorted(k for k in a if "experts" in k)[:4]}
    # the checkpoint holds the dense weights (not an initialization that happens to agree) ...
    res["embedding_vs_dense"] = (a["module.embedding.word_embeddings.weight"]
                                 - hf.get("model.embed_tokens.weight")).abs().max().item()
    # ... and a different upcycling seed gives a different router (negative control for the comparison)
    other = dict(moe, upcycle_seed=7)
    online_checkpoint(UpcycledLlamaConfig.from_dense(hf.config, **other), dense, work / "online_seed7")
    res["offline_vs_other_seed"] = max_diff(a, read_ckpt(work / "online_seed7"))

    # (c) a dense NeMo 2 checkpoint written by NeMo's own HF importer, then upcycled from it
    from nemo.collections.llm.gpt.model.llama import Llama3Config

    dense_cfg = Llama3Config(num_layers=3, hidden_size=36, ffn_hidden_size=44, num_attention_heads=6,
                                 num_query_groups=2, kv_channels=6, vocab_size=99, seq_length=64,
                                 layernorm_epsilon=1e-5, rotary_base=500000.0, params_dtype=torch.float32,
                                 **cpu_config_overrides())
    from nemo.collections.llm.gpt.model.llama import HFLlamaImporter

    class CPUImporter(HFLlamaImporter):  # NeMo's own HF Llama importer, with a config and a save that run on CPU
        def init(self):
            return llm.LlamaModel(dense_cfg)

        def nemo_setup(self, model, trainer=None, *args, **kwargs):
            return super().nemo_setup(model, trainer, *args, **{**kwargs, **cpu_strategy_kwargs()})

    nemo_dense = CPUImporter(str(dense)).apply(work / "nemo_dense")
    ns = open_dense(nemo_dense)
    res["nemo_source_class"] = type(ns).__name__
    res["nemo_source_vs_hf"] = max((ns.get(k).float() - hf.get(k).float()).abs().max().item() for k in hf.keys())
    res["nemo_source_config_equal"] = all(ns.config[k] == hf.config[k] for k in
                                          ("hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads", "vocab_size",
                                           "tie_word_embeddings"))
    from_nemo = llm.import_ckpt(UpcycledLlamaModel(UpcycledLlamaConfig.from_dense(hf.config, **moe)),
                                f"upcycle://{nemo_dense}", output_path=work / "from_nemo")
    res["from_nemo_vs_offline"] = max_diff(read_ckpt(from_nemo), a)
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
