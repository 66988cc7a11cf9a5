"""The HF <-> Megatron key table (``formats.keymap``): names, transforms and config fields, each with a control.

- transforms: q/k/v merge and split are inverse at odd sizes (GQA and MHA), tensor-parallel shards of every row
  reassemble; a wrong group count or a size that does not split is caught;
- names: every Megatron alternative (local and Transformer Engine) and every HF tensor resolves to its own row and
  slots; a table naming a tensor twice is refused; the TE names are Megatron's own (the local spec's
  ``sharded_state_dict_keys_map``);
- data: the filler (HF -> Megatron, the table forwards) then the export's reader (Megatron -> HF, backwards) gives
  every Mixtral tensor of ``formats.mixtral.layout`` as the upcycling makes it, over the names of a real Megatron
  model (slow) and over the table's TE names (no NeMo); a filler with one wrong row is caught;
- config: the fields are LlamaConfig's and NeMo's own names; the recipe's ``model.*`` group builds, through the
  table, an HF Llama of the recipe's shapes (control: two HF keys swapped is caught).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from nemo_upcycle.core import UpcycleOptions
from nemo_upcycle.core.upcycle import LayerExperts, router_weight
from nemo_upcycle.formats import keymap as km
from nemo_upcycle.formats.base import open_dense, read_dense_mlp
from nemo_upcycle.formats.keymap import KEYMAP, KeyMap, Row, Sizes, merge_qkv, split_qkv


# ---- transforms --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("H,G,hd,D", [(6, 2, 5, 7), (9, 3, 3, 11), (5, 5, 1, 13), (7, 1, 3, 5)])
def test_qkv_merge_split_inverse_at_odd_sizes(H, G, hd, D):
    g = torch.Generator().manual_seed(H * G)
    q, k, v = (torch.randn(n * hd, D, generator=g) for n in (H, G, G))
    qkv = merge_qkv(q, k, v, H, G)
    assert qkv.shape == ((H + 2 * G) * hd, D)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(qkv, H, G), (q, k, v)))
    per = H // G  # Megatron's grouped layout: group 0 holds its q heads, then its k head, then its v head
    assert torch.equal(qkv[: per * hd], q[: per * hd]) and torch.equal(qkv[per * hd:(per + 1) * hd], k[:hd])
    plain = torch.cat([q, k, v])  # negative control: with several groups the layout is not a plain concatenation
    assert torch.equal(plain, qkv) == (G == 1)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(plain, H, G), (q, k, v))) == (G == 1)


def test_shards_of_every_row_reassemble():
    g = torch.Generator().manual_seed(0)
    H, G, hd, D, F, V, Vp = 4, 2, 3, 8, 6, 10, 12
    sizes = Sizes(H, G, V, Vp)
    rows = {r.megatron[0]: r for r in KEYMAP.rows}
    shapes = {"Q": H * hd, "KV": G * hd, "D": D, "F": F, "Fe": F, "V": V, "E": 4}
    for name, row in rows.items():
        parts = [torch.randn(*t.shape_for(shapes), generator=g) for t in row.hf]
        whole = row.to_megatron(parts, sizes)
        shards = [row.to_megatron(parts, sizes, r, 2) for r in range(2)]
        if row.dim is None:
            assert all(torch.equal(s, whole) for s in shards), name
        elif row.transform == "glu":  # each half split: [gate_r; up_r] on rank r
            halves = [s.chunk(2) for s in shards]
            assert torch.equal(torch.cat([h[0] for h in halves] + [h[1] for h in halves]), whole), name
            assert not torch.equal(torch.cat(shards), whole)  # control: not a plain split
        else:
            assert torch.equal(torch.cat(shards, row.dim), whole), name
        back = row.to_hf(whole, sizes)
        assert all(torch.equal(a, b) for a, b in zip(back, parts)), name  # the inverse on one rank
    embed = rows["embedding.word_embeddings.weight"]
    padded = embed.to_megatron([torch.ones(V, D)], sizes)
    assert padded.shape == (Vp, D) and padded[V:].abs().sum() == 0  # padded rows: zero logits
    with pytest.raises(ValueError, match="does not split into 5"):  # negative control: 12 rows on 5 ranks
        embed.to_megatron([torch.ones(V, D)], sizes, 0, 5)


# ---- names -------------------------------------------------------------------------------------------------------
def test_every_name_resolves_to_its_row():
    for row in KEYMAP.rows:
        for m in row.megatron:
            hit = KEYMAP.megatron(m.format(layer=7, expert=3))
            assert hit.row is row and hit.layer == (7 if "{layer}" in m else None)
            assert hit.expert == (3 if "{expert}" in m else None)
            assert m.format(layer=7, expert=3) in hit.megatron_names()
        for i, t in enumerate(row.hf):
            hit = KEYMAP.hf(t.key(7, 3))
            assert (hit.row, hit.part, hit.layer) == (row, i, 7 if "{layer}" in t.name else None)
    for bad in ("decoder.layers.0.mlp.something_else.weight", "model.layers.x.mlp.gate_proj.weight", "lm_head.bias"):
        with pytest.raises(KeyError):
            KEYMAP.megatron(bad) if bad.startswith("decoder") else KEYMAP.hf(bad)


def test_a_name_in_two_rows_is_refused():
    dup = Row(("decoder.layers.{layer}.input_layernorm.weight",), (km.NORM,))
    with pytest.raises(ValueError, match="input_layernorm.weight is in two rows"):
        KeyMap(KEYMAP.rows + (dup,))
    with pytest.raises(ValueError, match="qkv needs 3 HF tensors"):
        KeyMap((Row(("x.weight",), (km.Q_PROJ, km.K_PROJ), "qkv", 0),))
    KeyMap(KEYMAP.rows)  # negative control: the table itself is accepted


def _names(L: int, E: int, tied: bool, alternative: int = 0) -> list[str]:
    """The MoE model's Megatron names from the table (``alternative`` 1: the TE / grouped-GEMM names)."""
    out = []
    for row in KEYMAP.rows:
        if row.megatron[0].startswith("decoder.layers.{layer}.mlp.linear_fc"):  # a dense layer's MLP
            continue
        if tied and row.tied is not None:
            continue
        m = row.megatron[min(alternative, len(row.megatron) - 1)]
        layers = range(L) if "{layer}" in m else [None]
        experts = range(E) if "{expert}" in m else [None]
        out += [m.format(layer=i, expert=e) for i in layers for e in experts]
    return out


def _upcycled(src, opts: UpcycleOptions):
    """What the upcycling makes each Mixtral tensor from (formats.mixtral.layout's recipes), independent of Megatron."""
    experts = LayerExperts(lambda i: read_dense_mlp(src.get, i), opts)

    def produce(recipe):
        if recipe[0] == "copy":
            return src.get(recipe[1])
        if recipe[0] == "router":
            return router_weight(src.config["hidden_size"], opts, recipe[1])
        return getattr(experts.get(recipe[1], recipe[2]), recipe[3])
    return produce


class _Module:
    """What the export reads of a Megatron module: its named parameters."""

    def __init__(self, params: dict):
        self.params = params

    def named_parameters(self):
        return iter(self.params.items())


def round_trip(src, opts, names, fill_map: KeyMap = KEYMAP) -> list[str]:
    """Fill ``names`` from ``src`` (filler, ``fill_map``), read every Mixtral tensor back (export, the table); the
    names of the tensors that differ from the upcycled ones."""
    from nemo_upcycle.engine.export import MegatronTensors
    from nemo_upcycle.engine.filler import MegatronFiller, RankLayout
    from nemo_upcycle.formats.mixtral import layout

    c = src.config
    filler = MegatronFiller(src.get, c, opts, RankLayout(), num_local_experts=opts.num_moe_experts, padded_vocab=128,
                            keymap=fill_map)
    config = SimpleNamespace(**km.hf_values(c))  # a Megatron config's fields
    reader = MegatronTensors(_Module({n: filler.tensor(n) for n in names}), config, c["vocab_size"])
    produce = _upcycled(src, opts)
    bad = [spec.name for spec, recipe in layout(c, opts, torch.float32)
           if not torch.equal(reader.get(spec.name), produce(recipe))]
    reader.check_all_used()
    return bad


@pytest.mark.parametrize("alternative", [0, 1], ids=["local", "te"])
def test_filler_then_export_round_trip(tiny_llama, tiny_llama_tied, alternative):
    opts = UpcycleOptions(4, 2, granularity=2)
    for dense, tied in ((tiny_llama, False), (tiny_llama_tied, True)):
        src = open_dense(dense)
        assert round_trip(src, opts, _names(3, 4, tied, alternative)) == []


def test_a_wrong_row_is_caught(tiny_llama):
    src, opts = open_dense(tiny_llama), UpcycleOptions(4, 2)
    names = _names(3, 4, False)
    checked = 0
    for i, row in enumerate(KEYMAP.rows):  # each: the filler's table with w1 / w3 or k / v swapped
        if row.transform in ("glu", "qkv") and "mlp.linear_fc1.weight" not in row.megatron[0]:
            hf = (row.hf[1], row.hf[0]) if row.transform == "glu" else (row.hf[0], row.hf[2], row.hf[1])
            wrong = KeyMap(KEYMAP.rows[:i] + (dataclasses.replace(row, hf=hf),) + KEYMAP.rows[i + 1:])
            bad = round_trip(src, opts, names, wrong)
            assert bad and all(n.endswith(("w1.weight", "w3.weight", "k_proj.weight", "v_proj.weight")) for n in bad)
            checked += 1
    assert checked == 2
    ends = [i for i, r in enumerate(KEYMAP.rows) if r.hf[0] in (km.EMBED, km.LM_HEAD)]  # embeddings <-> lm_head
    rows = list(KEYMAP.rows)
    rows[ends[0]], rows[ends[1]] = (dataclasses.replace(rows[ends[0]], hf=rows[ends[1]].hf),
                                    dataclasses.replace(rows[ends[1]], hf=rows[ends[0]].hf, tied=None))
    assert round_trip(src, opts, names, KeyMap(rows)) == ["model.embed_tokens.weight", "lm_head.weight"]


def test_nemo_source_builds_its_key_table_once(monkeypatch):
    from nemo_upcycle.engine import nemo_source
    from nemo_upcycle.formats import base

    calls = []
    real = base.llama_shapes
    monkeypatch.setattr(base, "llama_shapes", lambda c: calls.append(1) or real(c))
    src = object.__new__(nemo_source.NeMoDenseSource)
    src.config, src._shapes = {"hidden_size": 8, "intermediate_size": 4, "num_hidden_layers": 50,
                               "num_attention_heads": 2, "vocab_size": 5}, None
    assert [src.shape(k) for k in src.keys()][:1] == [(5, 8)]
    assert len(calls) == 1
    base.DenseSource.expected_shapes(src)  # control: the counter sees a build
    assert len(calls) == 2


# ---- config fields -----------------------------------------------------------------------------------------------
def test_config_fields_are_llamaconfig_keys():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    values = km.hf_values({**LlamaConfig().to_dict(), "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    hf = km.hf_config(values)
    cfg = LlamaConfig(**hf)
    for f in km.CONFIG_FIELDS:
        if not f.rope:
            assert getattr(cfg, f.hf) == values[f.megatron], f
    # transformers' Llama 3.1 RoPE reads exactly these rope_scaling keys (a wrong key is a KeyError there)
    ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert set(hf["rope_scaling"]) == {"rope_type"} | {f.hf for f in km.CONFIG_FIELDS if f.rope}
    assert km.hf_values(hf) == values  # HF -> Megatron names -> HF -> Megatron names
    assert km.megatron_values(SimpleNamespace(**values)) == values
    with pytest.raises(KeyError):  # negative control: a required key
        km.hf_values({k: v for k, v in hf.items() if k != "intermediate_size"})


def test_model_group_builds_the_recipe_shapes(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_upcycle.config.compose import compose
    from nemo_upcycle.config.schema import ModelSchema

    schema = {f.name for f in dataclasses.fields(ModelSchema)}
    assert {f.schema_key for f in km.CONFIG_FIELDS if f.schema_key} <= schema
    assert all(km.FIELDS[k].schema_key == k for k in km.SHAPE_FIELDS)  # precheck names model.<field>
    m = compose("tiny_llama_upcycle").model

    def shapes_agree() -> bool:
        hf = km.hf_config(km.model_values(m, rope=False))
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**hf))
        got = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
        kv = m.num_query_groups * m.kv_channels
        return got == km.llama_shapes(hf) and got["model.layers.0.mlp.gate_proj.weight"] == (
            m.ffn_hidden_size, m.hidden_size) and got["model.layers.2.self_attn.k_proj.weight"] == (kv, m.hidden_size)

    assert shapes_agree()
    swapped = tuple(dataclasses.replace(f, hf={"hidden_size": "intermediate_size", "intermediate_size": "hidden_size"}
                                        .get(f.hf, f.hf)) for f in km.CONFIG_FIELDS)
    monkeypatch.setattr(km, "CONFIG_FIELDS", swapped)
    assert not shapes_agree()  # negative control


# ---- a real Megatron model (slow: imports NeMo) ------------------------------------------------------------------
@pytest.mark.slow
def test_real_megatron_model_round_trips(megatron_world, tiny_llama):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from nemo_upcycle.engine.config import UpcycledLlama31Config, UpcycledLlamaConfig
    from nemo_upcycle.engine.cpu import cpu_config_overrides
    from nemo_upcycle.engine.export import MegatronTensors
    from nemo_upcycle.engine.model import upcycle_into
    from nemo_upcycle.formats.mixtral import layout

    nemo_fields = {f.name for f in dataclasses.fields(UpcycledLlama31Config)}
    assert {f.megatron for f in km.CONFIG_FIELDS} <= nemo_fields  # the table's names are NeMo's own
    te = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map  # Megatron's local -> TE renames
    renamed = [(row, local, to) for row in KEYMAP.rows for local, to in te.items() if f".{local}" in row.megatron[0]]
    assert len(renamed) == 2
    for row, local, to in renamed:
        assert row.megatron[1] == row.megatron[0].replace(local, to), row.megatron

    src = open_dense(tiny_llama)
    used = set()
    for freq in (1, [1, 0, 1]):  # all MoE, and layer 1 kept dense
        cfg = UpcycledLlamaConfig.from_dense(src.config, params_dtype=torch.float32, num_moe_experts=4,
                                             moe_router_topk=2, moe_token_dispatcher_type="allgather",
                                             moe_layer_freq=freq, **cpu_config_overrides())
        module = cfg.configure_model(None)
        for name, _ in module.named_parameters():  # every parameter: Megatron -> row -> HF -> the same row
            hit = KEYMAP.megatron(name)
            used.add(hit.row.megatron[0])
            assert name == hit.megatron_names()[0]  # the local spec's name comes first
            for i, t in enumerate(hit.row.hf):
                back = KEYMAP.hf(t.key(hit.layer, hit.expert))
                assert (back.row, back.part, back.layer, back.expert) == (hit.row, i, hit.layer, hit.expert)
        upcycle_into(module, cfg, src, progress=False)
        if freq == 1:  # HF Mixtral holds only sparse layers
            reader = MegatronTensors(module, cfg, src.config["vocab_size"])
            produce = _upcycled(src, cfg.upcycle_options())
            for spec, recipe in layout(src.config, cfg.upcycle_options(), torch.float32):
                assert torch.equal(reader.get(spec.name), produce(recipe)), spec.name
            reader.check_all_used()
            with torch.no_grad():  # negative control: one expert changed is seen
                module.decoder.layers[2].mlp.experts.local_experts[1].linear_fc2.weight.add_(1e-3)
            reader = MegatronTensors(module, cfg, src.config["vocab_size"])
            w2 = "model.layers.2.block_sparse_moe.experts.1.w2.weight"
            assert not torch.equal(reader.get(w2), produce(("expert", 2, 1, "down")))
    assert used == {r.megatron[0] for r in KEYMAP.rows}  # every row is a real parameter of the local spec
