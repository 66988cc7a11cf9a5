"""Upcycling options: what to build from the dense MLP, and how the router will route.

Names follow Megatron-core where it has one (``num_moe_experts``, ``moe_router_topk``,
``moe_router_pre_softmax``, ``moe_router_score_function``, ``moe_expert_capacity_factor``,
``moe_token_drop_policy``, ``moe_layer_freq``); the upcycling knobs follow the papers:

- granularity G = dense FFN / expert FFN, R = E / G copies of the dense MLP
  (He et al., "Upcycling Large Language Models into Mixture of Experts", arXiv 2410.07524);
- weight scaling ``megatron`` (Megatron-core ``upcycling_utils``: s**(1/3) on each SwiGLU matrix)
  or ``exact`` (the whole factor on the down projection, function-preserving for any activation);
- Drop-Upcycling ratio r (Nakamura et al., arXiv 2502.19261);
- expert noise (mergekit-moe's per-expert noise).

``step0_report`` says whether the MoE computes the dense function at step 0 and, if not, exactly why.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from nemo_upcycle.core.router_knobs import knobs_note, knobs_step0, topk_scale, validate_router_knobs
from nemo_upcycle.core.shared import shared_note, validate_shared
from nemo_upcycle.errors import FieldError

ROUTER_INITS = ("normal", "zeros", "virtual_group")
DATA_ROUTER_INITS = ("kmeans", "hidden")  # router rows from the dense model's hidden states (``core.router_init``)
SPLITS = ("contiguous", "random", "importance", "clustering")  # how a copy's units become G experts (``core.split``)
CALIBRATED_SPLITS = ("importance", "clustering")  # splits that need activation statistics on calibration text
NON_EXPERT = ("base", "average")  # where attention, norms and embeddings come from with several expert sources
INT_FIELDS = ("num_moe_experts", "moe_router_topk", "granularity", "seed")
FLOAT_FIELDS = ("router_std", "noise_std", "drop_ratio", "moe_expert_capacity_factor", "moe_aux_loss_coeff")
SCALINGS = ("exact", "megatron", "none")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
DROP_POLICIES = ("probs", "position")
CHOICES = {"scaling": SCALINGS, "router_init": ROUTER_INITS + DATA_ROUTER_INITS,
           "moe_router_score_function": SCORE_FUNCTIONS, "moe_token_drop_policy": DROP_POLICIES,
           "expert_split": SPLITS, "non_expert": NON_EXPERT}


@dataclass(frozen=True)
class UpcycleOptions:
    """Everything the core needs to turn one dense MLP into E experts and a router."""

    num_moe_experts: int
    moe_router_topk: int
    granularity: int = 1
    scaling: str = "exact"
    router_init: Optional[str] = None  # None: virtual_group when G > 1, else normal
    router_std: float = 0.02
    noise_std: float = 0.0
    drop_ratio: float = 0.0
    moe_layers: Union[str, Sequence[int]] = "all"  # "all", "every:N" or a list of layer indices
    seed: int = 1234
    # Routing semantics, recorded in the output config.
    moe_router_score_function: str = "softmax"
    moe_router_pre_softmax: bool = False
    norm_topk_prob: Optional[bool] = None  # None: renormalize unless pre-softmax
    moe_expert_capacity_factor: Optional[float] = None  # None = dropless
    moe_token_drop_policy: str = "probs"
    moe_pad_expert_input_to_capacity: bool = False
    moe_aux_loss_coeff: float = 1e-2
    # Shared experts (core.shared): S slots of the routed expert size, Megatron's moe_shared_expert_gate.
    shared_experts: int = 0
    moe_shared_expert_gate: bool = False
    # Routing knobs (core.router_knobs), Megatron's names.
    moe_router_enable_expert_bias: bool = False
    moe_router_topk_scaling_factor: Optional[float] = None
    moe_router_num_groups: Optional[int] = None
    moe_router_group_topk: Optional[int] = None
    moe_router_dtype: Optional[str] = None
    expert_split: str = "contiguous"  # how a copy's units are dealt to its G experts (core.split)
    # several dense sources (Branch-Train-MiX): copy i of every MoE layer from expert_sources[i % n]; the rest from
    # the base source or the average of the expert sources (core.sources)
    expert_sources: tuple = ()
    non_expert: str = "base"
    extra: dict = field(default_factory=dict)

    # ---- derived -------------------------------------------------------------------------------
    @property
    def copies(self) -> int:
        """R = E / G: how many whole copies of the dense MLP the experts are cut from."""
        return self.num_moe_experts // self.granularity

    @property
    def router_init_resolved(self) -> str:
        if self.router_init is not None:
            return self.router_init
        return "virtual_group" if self.granularity > 1 else "normal"

    @property
    def needs_calibration(self) -> bool:
        """Whether upcycling needs the dense model's activations on calibration text (``data.calibration``)."""
        return self.expert_split in CALIBRATED_SPLITS or self.router_init_resolved == "kmeans"

    @property
    def reads_text(self) -> bool:
        """Whether upcycling runs the dense model on text: calibration text, or a hidden router's prompts."""
        return self.needs_calibration or self.router_init_resolved == "hidden"

    @property
    def grouped_router(self) -> bool:
        """Whether the G experts of a copy share one router row (a virtual-group router): virtual_group, hidden
        (one prompt file per copy), kmeans (one centroid per copy) unless a clustering split gives every expert its
        own row from the tokens that activate its units."""
        kind = self.router_init_resolved
        return kind in ("virtual_group", "hidden") or (kind == "kmeans" and self.expert_split != "clustering")

    @property
    def renormalize(self) -> bool:
        """Whether the k routing weights of a token sum to 1."""
        if self.norm_topk_prob is not None:
            return self.norm_topk_prob
        if self.moe_router_score_function == "sigmoid":
            return self.moe_router_topk > 1  # Megatron normalizes sigmoid scores when k > 1
        return not self.moe_router_pre_softmax  # top-k then softmax sums to 1 by construction

    def scale_factor(self) -> float:
        """The weight-scaling factor s of He et al.: G with renormalized weights, R*G*G/k otherwise.

        ``megatron`` mode takes the choice from ``moe_router_pre_softmax`` alone, as Megatron-core does;
        ``exact`` mode from whether the k weights really sum to 1 (``renormalize``).
        """
        if self.scaling == "none":
            return 1.0
        plain = not self.moe_router_pre_softmax if self.scaling == "megatron" else self.renormalize
        fold = 1.0 / topk_scale(self) if self.scaling == "exact" else 1.0  # moe_router_topk_scaling_factor
        if plain:
            return float(self.granularity) * fold
        return self.copies * self.granularity * self.granularity / self.moe_router_topk * fold

    def validate(self, ffn_hidden_size: Optional[int] = None, num_layers: Optional[int] = None) -> "UpcycleOptions":
        """Raise ``FieldError`` (naming the fields) on an impossible combination; return self for chaining."""
        for name in INT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise FieldError(f"{{{name}+}} = {v!r} is not an integer; pass a whole number.", **{name: v})
        for name in FLOAT_FIELDS:
            v = getattr(self, name)
            if v is None and name == "moe_expert_capacity_factor":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise FieldError(f"{{{name}+}} = {v!r} is not a finite number; pass a finite value.", **{name: v})
        E, G = self.num_moe_experts, self.granularity
        if err := topk_error(E, self.moe_router_topk):
            raise err
        if G < 1:
            raise FieldError("{granularity=} must be at least 1.", granularity=G)
        if E % G:
            raise FieldError("{num_moe_experts=} is not a multiple of {granularity=}: each copy of the dense MLP is "
                             "cut into G experts; choose E = R*G.", num_moe_experts=E, granularity=G)
        if ffn_hidden_size is not None and ffn_hidden_size % G:
            raise FieldError(f"{{granularity=}} does not divide the dense FFN size {ffn_hidden_size}; choose a divisor "
                             f"of {ffn_hidden_size}.", granularity=G)
        for name, allowed in CHOICES.items():
            if (self.router_init_resolved if name == "router_init" else getattr(self, name)) not in allowed:
                raise FieldError(f"{{{name}=}} is not one of {', '.join(allowed)}.", **{name: getattr(self, name)})
        if G == 1 and self.expert_split != "contiguous":
            raise FieldError("{expert_split=} splits a copy's units into G experts; at {granularity=} every expert is "
                             "the whole MLP: drop the split or raise the granularity.", expert_split=self.expert_split,
                             granularity=G)
        if self.non_expert == "average" and not self.expert_sources:
            raise FieldError("{non_expert=} averages the expert sources' attention and embeddings; give "
                             "{expert_sources} or use base.", non_expert=self.non_expert, expert_sources=[])
        if not 0.0 <= self.drop_ratio <= 1.0:
            raise FieldError("{drop_ratio=} is outside [0, 1]; it is the fraction of each expert's units "
                             "re-initialized.", drop_ratio=self.drop_ratio)
        if self.noise_std < 0 or self.router_std < 0:
            raise FieldError("{noise_std} and {router_std} must be >= 0.", noise_std=self.noise_std,
                             router_std=self.router_std)
        cf = self.moe_expert_capacity_factor
        if cf is not None and cf <= 0:
            raise FieldError("{moe_expert_capacity_factor=} must be > 0 (omit it for dropless routing).",
                             moe_expert_capacity_factor=cf)
        if self.moe_aux_loss_coeff < 0:
            raise FieldError("{moe_aux_loss_coeff=} must be >= 0 (0 turns the load-balancing loss off).",
                             moe_aux_loss_coeff=self.moe_aux_loss_coeff)
        if num_layers is not None:
            resolve_moe_layers(self.moe_layers, num_layers)
        validate_shared(self)
        self._check_shared_with_data()
        validate_router_knobs(self)
        return self

    def _check_shared_with_data(self) -> None:
        """Shared experts hold contiguous shards of one dense MLP (core.shared): refuse what would break that."""
        S, G = self.shared_experts, self.granularity
        if S and self.expert_sources:
            raise FieldError("{shared_experts=} with {expert_sources}: a shared expert comes from one dense MLP "
                             "and the experts from several sources; drop one of them.", shared_experts=S,
                             expert_sources=list(self.expert_sources))
        if S % G and self.expert_split != "contiguous":
            raise FieldError(f"{{shared_experts=}} is not a multiple of {{granularity=}} with the {{expert_split=}}: "
                             "the routed experts would not cover the shards the shared expert halves; use a multiple "
                             f"of {G} or the contiguous split.", shared_experts=S, granularity=G,
                             expert_split=self.expert_split)

    def to_record(self) -> dict:
        """What goes into the output config under ``upcycling`` (JSON-safe)."""
        rec = dataclasses.asdict(self)
        rec.pop("extra")
        rec["router_init"] = self.router_init_resolved
        rec["norm_topk_prob"] = self.renormalize
        rec["scale_factor"] = self.scale_factor()
        rec["moe_layers"] = self.moe_layers if isinstance(self.moe_layers, str) else list(self.moe_layers)
        rec["expert_sources"] = [str(s) for s in self.expert_sources]
        exact, reason = step0_report(self)
        rec["step0_equivalent"] = exact
        rec["step0_note"] = reason
        rec.update(self.extra)
        return rec


def topk_error(num_moe_experts: int, moe_router_topk: int) -> Optional[FieldError]:
    """The refusal of E < 1 or k outside 1..E (None when they are fine): the options' rule, which the planning
    layout check reports too."""
    E, k = num_moe_experts, moe_router_topk
    if E < 1:
        return FieldError("{num_moe_experts=} must be at least 1.", num_moe_experts=E)
    if not 1 <= k <= E:
        return FieldError("{moe_router_topk=} must be between 1 and {num_moe_experts=}; lower {moe_router_topk} or "
                          "raise {num_moe_experts}.", moe_router_topk=k, num_moe_experts=E)
    return None


def moe_layers_of(moe_layer_freq: Union[int, Sequence[int]]) -> Union[str, list[int]]:
    """Megatron's ``moe_layer_freq`` (N: layers i with i % N == 0; a list: 1 / 0 per layer) as ``moe_layers``."""
    if isinstance(moe_layer_freq, int):
        return "all" if moe_layer_freq == 1 else f"every:{moe_layer_freq}"
    return [i for i, moe in enumerate(moe_layer_freq) if moe]


def resolve_moe_layers(spec: Union[str, Sequence[int]], num_layers: int) -> list[int]:
    """``all`` | ``every:N`` (Megatron ``moe_layer_freq=N``: layers i with i % N == 0) | list -> sorted indices."""
    if isinstance(spec, str):
        s = spec.strip()
        if s == "all":
            return list(range(num_layers))
        if s.startswith("every:"):
            try:
                n = int(s.split(":", 1)[1])
            except ValueError:
                n = 0
            if n < 1:
                raise FieldError("{moe_layers=}: N in every:N must be a positive integer.", moe_layers=spec)
            return [i for i in range(num_layers) if i % n == 0]
        try:
            spec = [int(p) for p in s.split(",") if p.strip()]
        except ValueError:
            raise FieldError("{moe_layers=} is not 'all', 'every:N' or a comma list of layer indices.",
                             moe_layers=spec) from None
    layers = sorted(set(int(i) for i in spec))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise FieldError(f"{{moe_layers=}} names no layer or layers outside 0..{num_layers - 1}; pick indices below "
                         f"{num_layers}.", moe_layers=list(spec))
    return layers


def step0_report(opts: UpcycleOptions) -> tuple[bool, str]:
    """(True, why) if the upcycled MoE computes the dense function at step 0, else (False, exactly why).

    The argument: with renormalized routing weights w (sum 1) and experts e = shard j of copy i,
    MoE(x) = sum_sel w_e * s * shard_j(x). For G = 1 every shard is the whole MLP, so MoE(x) = s * dense(x).
    For G > 1 a virtual-group router gives the G shards of one copy the same logit; when k is a multiple
    of G the top-k holds whole copies, each shard weighted w_i / G, and sum_j shard_j(x) = dense(x)
    (SwiGLU acts per intermediate unit), so MoE(x) = s / G * dense(x): exact when the factor s = G sits on
    the linear down projection.
    """
    exact, why = _routed_step0(opts)
    knob = knobs_step0(opts) if exact else None
    if knob:
        return False, knob
    return exact, why + (shared_note(opts) + knobs_note(opts) if exact else "")


def _routed_step0(opts: UpcycleOptions) -> tuple[bool, str]:
    k, G = opts.moe_router_topk, opts.granularity
    if opts.expert_sources:
        n = len(opts.expert_sources)
        rest = "average of the sources" if opts.non_expert == "average" else "base"
        return False, (f"the experts come from {n} dense source{'s' if n > 1 else ''} (copy i from source i mod {n}), "
                       f"attention and embeddings from the {rest}: "
                       "the MoE is none of the dense models; verify reports how close it is to each source when "
                       "routed to that source's experts.")
    if opts.noise_std > 0:
        return False, f"expert noise (std {opts.noise_std}) perturbs every expert away from the dense MLP."
    if opts.drop_ratio > 0:
        return False, f"Drop-Upcycling re-initializes {opts.drop_ratio:.0%} of each expert's units."
    if not opts.renormalize:
        return False, ("routing weights are not renormalized (softmax then top-k / sigmoid): the output is scaled by "
                       f"the sum of the k kept scores (< 1), times the scaling factor {opts.scale_factor():g}.")
    if G == 1:
        return True, "every expert is the dense MLP and the k routing weights sum to 1."
    if not opts.grouped_router:
        return False, (f"G={G} experts need a virtual-group router (the G shards of a copy must share a row); got "
                       f"{opts.router_init_resolved}" + (" with a clustering split (a row per expert)"
                                                         if opts.router_init_resolved == "kmeans" else "") + ".")
    if k % G:
        return False, f"top-{k} is not a multiple of G={G}: a token sees only {k % G or k} of the G shards of a copy."
    if opts.scaling != "exact":
        if opts.scaling == "none":
            return False, f"no weight scaling: the output is 1/G = 1/{G} of the dense MLP."
        return False, (f"megatron scaling puts s^(1/3) = {G ** (1 / 3):.4f} on gate, up and down; SiLU is not "
                       "homogeneous, so the output only approximates the dense MLP (use --scaling exact).")
    split = "" if opts.expert_split == "contiguous" else f"the {opts.expert_split} split partitions each copy's units, "
    return True, (f"{split}virtual-group router ({opts.router_init_resolved}), top-{k} holds whole copies, and the "
                  f"factor {G} sits on the down projection.")
