"""Train NeMo 2 / Megatron-core models on a machine without CUDA (gloo, CPU tensors).

NeMo 2.7.3 and megatron-core 0.15.3 assume CUDA at known call sites: ``torch.cuda.current_device()`` as the device of
buffers, ``device="cuda"``, ``.cuda()``, ``pin_memory=True``, streams and events, ``synchronize()``, the CUDA RNG
tracker. ``enable_cpu_support()`` bypasses exactly those sites, only without CUDA and only for the pinned versions
(``PINNED``; ``UpcycleError`` on others). *Scoped* sites (``_SCOPED``, each with its upstream file) are wrapped so
that a ``TorchFunctionMode`` moves the torch calls written in their own body to the CPU (what they call into is not
touched; torch's factories are never replaced). *Replaced* ones (the RNG tracker and its seeding, gradient clipping,
the all-to-all split sizes, a missing TE symbol, NeMo's loaded-tensor device fix, a rank-0-only empty all-gather that
desynchronizes gloo, uneven all-gathers / reduce-scatters that gloo refuses) are swapped for CPU versions, each helper
naming its site.

Use, in this order: ``enable_cpu_support()`` before building the trainer; ``**cpu_config_overrides()`` in every
model config; ``nl.MegatronStrategy(..., **cpu_strategy_kwargs())`` (no async checkpoint save: it synchronizes
CUDA); ``nl.Trainer(accelerator="cpu", ...)``. Tested over gloo against one rank (tests/test_layouts.py): DP, EP,
ETP, TP + SP, PP, PP x VP and their products up to PP4 x VP8 x EP2 on 8 ranks; distributed-checkpoint save / load.
Not here: CP (needs TE attention), the distributed optimizer, grouped GEMM, TE, fp8.
Mixed precision (bf16-mixed, 16-mixed): ``engine/cpu_mixed.py``, applied by ``enable_cpu_support``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import sys

import torch
from torch.overrides import TorchFunctionMode

from nemo_upcycle.engine import cpu_mixed, cpu_optim
from nemo_upcycle.errors import UpcycleError

PINNED = {"nemo-toolkit": ("nemo.package_info", "2.7.3"),
          "megatron-core": ("megatron.core.package_info", "0.15.3")}

_ACTIVE: list[frozenset] = []  # code objects whose torch calls are redirected now (one set per open scope)


def _redirected(code) -> bool:
    return any(code in codes for codes in _ACTIVE)


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # an index from current_device()


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA placement in torch calls made directly by a function in ``_ACTIVE``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling() or not _redirected(sys._getframe(1).f_code):
            return func(*args, **kwargs)
        if func is torch.Tensor.cuda:
            return args[0]
        kwargs = {k: ("cpu" if k == "device" and _is_cuda(v) else False if k == "pin_memory" else v)
                  for k, v in kwargs.items()}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NoStream:
    """Stands in for ``torch.cuda.Stream`` and ``Event``: CPU work is already ordered, so every method is a no-op."""
    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):  # wait_stream, synchronize, record_event, ...
        return lambda *args, **kwargs: _NoStream()


_CUDA_STANDINS = {
    "current_device": lambda: 0,  # an index; the mode maps device=0 to the CPU
    "Stream": _NoStream,
    "stream": lambda stream=None: contextlib.nullcontext(),
    "current_stream": lambda device=None: _NoStream(),
    "synchronize": lambda device=None: None,
    "max_memory_reserved": lambda device=None: 0,
    "max_memory_allocated": lambda device=None: 0,
}


def _guarded(name, original):
    standin = _CUDA_STANDINS[name]

    @functools.wraps(original)
    def cuda_function(*args, **kwargs):
        return (standin if _redirected(sys._getframe(1).f_code) else original)(*args, **kwargs)

    return cuda_function


@contextlib.contextmanager
def _cuda_as_cpu(codes: frozenset):
    saved = {name: getattr(torch.cuda, name) for name in _CUDA_STANDINS}
    for name, original in saved.items():
        setattr(torch.cuda, name, _guarded(name, original))
    _ACTIVE.append(codes)
    try:
        with _CudaToCpu():
            yield
    finally:
        _ACTIVE.pop()
        for name, original in saved.items():
            setattr(torch.cuda, name, original)


def _resolve(module: str, qualname: str):
    owner = importlib.import_module(module)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def _with_nested(code) -> list:
    """A code object and those of the functions defined inside it (closures: p2p's ``create_tensor_recv_prev``)."""
    out = [code]
    for const in code.co_consts:
        if inspect.iscode(const):
            out += _with_nested(const)
    return out


def _scope(module: str, qualname: str, callees: tuple[str, ...] = ()) -> None:
    """Wrap ``module.qualname`` so CUDA requests written in its body (and in ``callees``) land on the CPU."""
    owner, name = _resolve(module, qualname)
    fn = getattr(owner, name)
    helpers = [getattr(*_resolve(*c.rsplit(":", 1))) for c in callees]
    codes = frozenset(c for f in (fn, *helpers) for c in _with_nested(inspect.unwrap(f).__code__))

    @functools.wraps(fn)
    def on_cpu(*args, **kwargs):
        with _cuda_as_cpu(codes):
            return fn(*args, **kwargs)

    static = isinstance(inspect.getattr_static(owner, name), staticmethod)
    setattr(owner, name, staticmethod(on_cpu) if static else on_cpu)


def _replace(module: str, qualname: str, value) -> None:
    owner, name = _resolve(module, qualname)
    setattr(owner, name, value)


MC, NL, DC = "megatron.core.", "nemo.lightning.", "megatron.core.dist_checkpointing."
# (module, function, helpers it calls whose torch calls are redirected too); each comment names the CUDA-only
# lines (megatron-core 0.15.3 under megatron/core/, NeMo 2.7.3 under nemo/) and what they do.
_SCOPED = [
    # models/common/embeddings/rotary_pos_embedding.py:164 moves inv_freq to current_device() on first use
    (MC + "models.common.embeddings.rotary_pos_embedding", "RotaryEmbedding.forward", ()),
    # utils.py:535 the shared attention matmul buffer on torch.cuda.current_device()
    (MC + "utils", "GlobalMemoryBuffer.get_tensor", ()),
    # transformer/moe/router.py:86/88 moves the router weight and bias to current_device() before gating
    (MC + "transformer.moe.router", "Router.gating", ()),
    # transformer/moe/router.py:165-194 expert-bias and global-aux-loss buffers on current_device()
    (MC + "transformer.moe.router", "TopKRouter.__init__", ()),
    # transformer/moe/token_dispatcher.py:425 the class-wide torch.cuda.Stream() for device-to-host copies,
    # :831-858 current_stream / stream / record_event around those copies
    (MC + "transformer.moe.token_dispatcher", "MoEAlltoAllTokenDispatcher.__init__", ()),
    (MC + "transformer.moe.token_dispatcher", "MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize", ()),
    # tensor_parallel/mappings.py:91/141/148/181 gather and reduce-scatter outputs and :442 the all-to-all-v
    # output on current_device() (the allgather and alltoall dispatchers at EP > 1)
    *[(MC + "tensor_parallel.mappings", fn, ()) for fn in (
        "_gather_along_first_dim", "_reduce_scatter_along_first_dim", "_gather_along_last_dim",
        "_reduce_scatter_along_last_dim", "_AllToAll.forward")],
    # tensor_parallel/layers.py:544/589/599 (sequence parallelism) the reduce-scatter output of the input gradient
    # and the weight-gradient buffers on current_device()
    (MC + "tensor_parallel.layers", "LinearWithGradAccumulationAndAsyncCommunication.backward", ()),
    # distributed/param_and_grad_buffer.py:702/719/725 DDP param and grad buffers on current_device()
    (MC + "distributed.param_and_grad_buffer", "_ParamAndGradBuffer.__init__", ()),
    # optimizer/optimizer.py:469/477/481 found_inf, overflow and scale tensors, :903 the fp32 optimizer's
    # loss scale, all on device='cuda'
    (MC + "optimizer.optimizer", "MixedPrecisionOptimizer.__init__", ()),
    (MC + "optimizer.optimizer", "FP32Optimizer.__init__", ()),
    # optimizer/clip_grads.py:90/103/115 norm buffers on 'cuda'; utils.py:1029 the torch fallback of the
    # l2-norm kernel returns its result on 'cuda'
    (MC + "optimizer.optimizer", "get_grad_norm_fp32", (MC + "utils:local_multi_tensor_l2_norm",)),
    # pipeline_parallel/schedules.py:573/963/2114 total_num_tokens on "cuda" in each schedule (the model it runs is
    # not redirected)
    *[(MC + "pipeline_parallel.schedules", fn, ()) for fn in (
        "forward_backward_no_pipelining", "forward_backward_pipelining_with_interleaving",
        "forward_backward_pipelining_without_interleaving")],
    # pipeline_parallel/p2p_communication.py:190-202 shape buffers, :313/321 receive buffers on current_device(),
    # :242/398 torch.cuda.synchronize() after the exchange
    (MC + "pipeline_parallel.p2p_communication", "P2PCommunicator._communicate_shapes", ()),
    (MC + "pipeline_parallel.p2p_communication", "P2PCommunicator._communicate", ()),
    # timers.py:149/162 torch.cuda.synchronize() around every timer, :286 the gathered times on CUDA
    (MC + "timers", "Timer.start", ()),
    (MC + "timers", "Timer.stop", ()),
    (MC + "timers", "Timers._get_elapsed_time_all_ranks", ()),
    # dist_checkpointing/strategies/filesystem_async.py:230 synchronize() after staging (also when synchronous)
    (DC + "strategies.filesystem_async", "FileSystemWriterAsync.preload_tensors", ()),
    # dist_checkpointing/strategies/state_dict_saver.py:251 the save-failure flag broadcast from CUDA
    (DC + "strategies.torch", "save_state_dict_async_finalize", ()),
    # dist_checkpointing/strategies/fully_parallel.py:272/281 synchronize() after the load exchange;
    # exchange_utils.py:101-113, :329/339, :502 the ranks exchange the shards each one read as CUDA tensors
    (DC + "strategies.fully_parallel", "FullyParallelLoadStrategyWrapper.load", ()),
    (DC + "exchange_utils", "_get_empty_tensor_for_exchange", (DC + "mapping:ShardedTensor.init_data",)),
    (DC + "exchange_utils", "exchange_loaded_tensors_gather_rounds", ()),
    (DC + "exchange_utils", "exchange_loaded_tensors_broadcast", ()),
    # nemo/lightning/megatron_parallel.py:617 init_ddp inside torch.cuda.stream(torch.cuda.Stream())
    (NL + "megatron_parallel", "MegatronParallel.init_model_parallel", ()),
    # nemo/lightning/megatron_parallel.py:348 the zero loss of a stage that is not the last one (pipeline) and
    # :1847/1857 the empty loss sums of the token-averaged reduction, on current_device()
    (NL + "megatron_parallel", "MegatronParallel.forward", ()),
    (NL + "megatron_parallel", "MaskedTokenLossReduction.reduce", ()),
    # nemo/collections/llm/gpt/model/base.py:103 gpt_data_step moves the batch with .cuda(non_blocking=True)
    ("nemo.collections.llm.gpt.model.base", "GPTModel.data_step",
     ("nemo.collections.llm.gpt.model.base:gpt_data_step",)),
    # nemo/lightning/pytorch/strategies/megatron_strategy.py:801/821/828/850 (logged step, memory, loss) and
    # :881/888 (grad norm, zero count): torch.tensor(x, pin_memory=True).to("cuda")
    (NL + "pytorch.strategies.megatron_strategy", "MegatronStrategy.training_step", ()),
    (NL + "pytorch.strategies.megatron_strategy", "MegatronStrategy.optimizer_step", ()),
    # nemo/lightning/pytorch/plugins/data_sampler.py:212 the logged global batch size, the same way
    (NL + "pytorch.plugins.data_sampler", "MegatronDataSampler.on_megatron_step_end", ()),
]


def _move_to_cpu_as_on_gpu(tensor, as_numpy=False, record_stream=False):
    """transformer/moe/moe_utils.py:883 converts only CUDA tensors to numpy; the all-to-all split sizes must
    be numpy (lists) on CPU too, as torch.distributed.all_to_all_single wants."""
    return tensor.numpy() if torch.is_tensor(tensor) and as_numpy else tensor


def _even_collectives(gather, reduce_scatter):
    """tensor_parallel/mappings.py:149 all-gathers uneven row counts (``output_split_sizes``: the tokens each
    expert-tensor-parallel rank routed, TP + SP x EP) as a list, and :192 (its backward) reduce-scatters uneven splits;
    gloo needs equal sizes ("ProcessGroupGloo::allgather: invalid tensor size"), NCCL does not. Pad every split to the
    largest, use the equal-size collective, cut. Without split sizes: the stock (scoped) functions."""
    def pad(t, rows):
        return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t

    @functools.wraps(gather)
    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        most = max(output_split_sizes)
        out = input_.new_empty((group.size() * most, *input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(out, pad(input_.contiguous(), most), group=group)
        return torch.cat([c[:n] for c, n in zip(out.split(most), output_split_sizes)])

    @functools.wraps(reduce_scatter)
    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        most = max(input_split_sizes)
        out = input_.new_empty((most, *input_.shape[1:]))
        padded = torch.cat([pad(c, most) for c in input_.split(list(input_split_sizes))])
        torch.distributed.reduce_scatter_tensor(out, padded, group=group)
        return out[: input_split_sizes[group.rank()]]

    return _gather_along_first_dim, _reduce_scatter_along_first_dim


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """optimizer/clip_grads.py:167 asserts 'torch.cuda.FloatTensor' grads; the same in-place scaling for CPU grads."""
    from megatron.core.utils import to_local_if_dtensor

    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [to_local_if_dtensor(getattr(p, attr)).detach() for p in parameters
             if getattr(p, attr, None) is not None]
    assert all(g.dtype in (torch.float32, torch.bfloat16) for g in grads), "gradients must be fp32 or bf16"
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _skip_empty_timer_gather(stock):
    """timers.py:297 all-gathers the timer table; NeMo's ProgressPrinter calls it on rank 0 only
    (nemo/lightning/pytorch/callbacks/progress_printer.py:155), with no timers registered at the default
    log level. NCCL skips a gather of nothing; gloo still uses up a collective tag on rank 0 alone, so the
    next collective (the checkpoint save's all_gather_object) hangs."""

    @functools.wraps(stock)
    def _get_elapsed_time_all_ranks(self, names, reset, barrier):
        return stock(self, names, reset, barrier) if names else torch.zeros(torch.distributed.get_world_size(), 0)

    return _get_elapsed_time_all_ranks


def _loaded_tensors_stay(ckpt):
    """nemo/lightning/io/pl.py:493-503 asserts CUDA is initialized and moves loaded CUDA tensors to the
    current device; loaded CPU tensors are where they belong."""
    return ckpt


def _cpu_rng_tracker_class():
    """tensor_parallel/random.py:196-226 keeps named CUDA generator states (the model-parallel and expert
    streams that dropout and GPU init fork into); here the same named streams, on the CPU generator."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            if seed in self.seeds_ or name in self.states_:
                raise Exception(f"rng state {name} or seed {seed} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outside = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outside)

    return CpuRNGStatesTracker


def _seed_with_tracker(stock_set_random_seed):
    """nemo/lightning/megatron_init.py:238 seeds the tracker only if torch.cuda.device_count() > 0; seed it
    on CPU too (the same seeds as on GPU)."""

    @functools.wraps(stock_set_random_seed)
    def _set_random_seed(seed_):
        from megatron.core import parallel_state, tensor_parallel

        stock_set_random_seed(seed_)
        tensor_parallel.model_parallel_cuda_manual_seed(
            seed_ + 100 * parallel_state.get_pipeline_model_parallel_rank())

    return _set_random_seed


def check_versions() -> None:
    """Raise UpcycleError unless the installed NeMo and megatron-core are the versions these patches were read from."""
    for dist, (module, want) in PINNED.items():
        try:
            have = importlib.import_module(module).__version__
        except ImportError:
            raise UpcycleError(f"{dist} is not installed; install {dist}=={want} (pip install '.[nemo]')") from None
        if have != want:
            raise UpcycleError(f"the CPU support was written for {dist}=={want}, found {have}; "
                               f"install {dist}=={want} or run on a CUDA machine")


_ENABLED = False


def enable_cpu_support() -> bool:
    """Apply every bypass above once, before building the trainer; returns whether anything was patched.

    A no-op (False) when CUDA is available. Raises UpcycleError on versions other than ``PINNED``.
    """
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    check_versions()
    for module, qualname, callees in _SCOPED:
        _scope(module, qualname, callees)
    moe_utils = importlib.import_module(MC + "transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):  # transformer/moe/moe_utils.py:958 reads it; TE defines it
        moe_utils.te_general_gemm = None
    _replace(MC + "transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu", _move_to_cpu_as_on_gpu)
    _replace(MC + "optimizer.optimizer", "clip_grad_by_total_norm_fp32", _clip_grad_by_total_norm_fp32)
    mappings = importlib.import_module(MC + "tensor_parallel.mappings")  # after _SCOPED: wraps the scoped versions
    mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim = _even_collectives(
        mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim)
    _replace(MC + "tensor_parallel.random", "CudaRNGStatesTracker", _cpu_rng_tracker_class())
    timers = importlib.import_module(MC + "timers").Timers
    timers._get_elapsed_time_all_ranks = _skip_empty_timer_gather(timers._get_elapsed_time_all_ranks)
    # nemo/lightning/io/pl.py:495 asserts torch.cuda.is_initialized() to move loaded tensors between CUDA devices
    _replace(NL + "io.pl", "_fix_tensors_device", _loaded_tensors_stay)
    megatron_init = importlib.import_module(NL + "megatron_init")
    megatron_init._set_random_seed = _seed_with_tracker(megatron_init._set_random_seed)
    for module, qualname, callees in cpu_mixed.MIXED_SCOPED:  # bf16-mixed / 16-mixed: engine/cpu_mixed.py
        _scope(module, qualname, callees)
    cpu_mixed.enable_mixed_precision_sites()
    cpu_optim.enable_fused_adam()  # torch's fused CPU Adam instead of its for-loop (engine/cpu_optim.py)
    _ENABLED = True
    return True


def cpu_config_overrides() -> dict:
    """TransformerConfig / GPTConfig fields to set on CPU (NeMo's GPTConfig turns several fusions on)."""
    return dict(
        use_cpu_initialization=True,  # needed: else weights are allocated on torch.cuda.current_device()
        apply_rope_fusion=False,  # needed without TE (ValueError at config time)
        moe_permute_fusion=False,  # needed: TE kernels (token_dispatcher.py:389 puts indices on CUDA)
        moe_grouped_gemm=False,  # needed: TE / grouped_gemm kernels; experts run as SequentialMLP
        gradient_accumulation_fusion=False,  # needed: a CUDA extension (NeMo enables it where it imports)
        masked_softmax_fusion=False,  # a CUDA kernel; Megatron falls back to torch softmax anyway
        persist_layer_norm=False,  # apex only
        # torch.compile'd fusions: they work on CPU, but compiling costs ~30 s per process for no gain
        cross_entropy_loss_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
    )


def cpu_strategy_kwargs() -> dict:
    """MegatronStrategy arguments for CPU: synchronous checkpoint save (the async one synchronizes CUDA at
    dist_checkpointing/strategies/async_utils.py:210)."""
    return dict(ckpt_async_save=False)
