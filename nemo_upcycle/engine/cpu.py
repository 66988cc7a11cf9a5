"""Train NeMo 2 / Megatron-core models on a machine without CUDA (gloo, CPU tensors).

NeMo 2.7.3 and megatron-core 0.15.3 assume CUDA at a known set of call sites: ``torch.cuda.current_device()``
as the device of buffers, ``device="cuda"`` literals, ``.cuda()``, ``pin_memory=True``, CUDA streams and
events, ``torch.cuda.synchronize()`` and the CUDA RNG tracker. :func:`enable_cpu_support` (a no-op when CUDA
is available) bypasses exactly those sites, checked against the pinned versions, and nothing else.

How a call site is bypassed
- *Scoped* (``_SCOPED``): the named function is wrapped; while it runs, only torch calls written in its own
  body (or in the listed helpers it calls) are redirected: ``device`` cuda -> cpu, ``Tensor.cuda()`` /
  ``.to("cuda")`` -> stay on CPU, ``pin_memory`` -> False, and ``torch.cuda.{current_device, Stream, stream,
  current_stream, synchronize, max_memory_*}`` -> CPU stand-ins. The caller's frame decides, so code the
  function calls into (the model inside ``forward_backward_no_pipelining``) is not redirected, and
  ``torch.zeros`` and friends are never replaced: a ``TorchFunctionMode`` does it, only inside the scope.
- *Replaced* (``_replace``): a module attribute is set to a CPU equivalent, where a wrapper cannot help
  (an assert on ``torch.cuda.FloatTensor``, a missing TE symbol, the RNG tracker class).

Every site is listed below with file:line (megatron/core/... or nemo/...) and the reason.

Model and config settings a caller must use on CPU: :func:`cpu_config_overrides` (TransformerConfig fields:
CPU initialization, no CUDA/TE fusions) and :func:`cpu_strategy_kwargs` (``MegatronStrategy``: synchronous
checkpoint save). Token dispatchers ``alltoall`` and ``allgather`` work (EP > 1 over gloo too); ``flex``
(DeepEP), grouped GEMM, Transformer Engine specs, fp8, CUDA graphs and the distributed optimizer do not.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import sys

import torch
from torch.overrides import TorchFunctionMode

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
    """Stands in for ``torch.cuda.Stream`` / ``Event``: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return _NoStream()


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
        if _redirected(sys._getframe(1).f_code):
            return standin(*args, **kwargs)
        return original(*args, **kwargs)

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


def _scope(module: str, qualname: str, callees: tuple[str, ...] = ()) -> None:
    """Wrap ``module.qualname`` so CUDA requests written in its body (and in ``callees``) land on the CPU."""
    owner, name = _resolve(module, qualname)
    fn = getattr(owner, name)
    helpers = [getattr(*_resolve(*c.rsplit(":", 1))) for c in callees]
    codes = frozenset(inspect.unwrap(f).__code__ for f in (fn, *helpers))

    @functools.wraps(fn)
    def on_cpu(*args, **kwargs):
        with _cuda_as_cpu(codes):
            return fn(*args, **kwargs)

    static = isinstance(inspect.getattr_static(owner, name), staticmethod)
    setattr(owner, name, staticmethod(on_cpu) if static else on_cpu)


def _replace(module: str, qualname: str, value) -> None:
    owner, name = _resolve(module, qualname)
    setattr(owner, name, value)


MC, NL = "megatron.core.", "nemo.lightning."
# (module, function, helpers it calls whose torch calls are redirected too); the comment names the
# CUDA-only lines (megatron-core 0.15.3 / NeMo 2.7.3) and what they do.
_SCOPED = [
    # rotary_pos_embedding.py:164 moves inv_freq to torch.cuda.current_device() on the first forward
    (MC + "models.common.embeddings.rotary_pos_embedding", "RotaryEmbedding.forward", ()),
    # utils.py:535 allocates the shared attention matmul buffer on torch.cuda.current_device()
    (MC + "utils", "GlobalMemoryBuffer.get_tensor", ()),
    # router.py:86/88 moves the router weight and bias to torch.cuda.current_device() before gating
    (MC + "transformer.moe.router", "Router.gating", ()),
    # router.py:165-194 expert-bias and global-aux-loss buffers on torch.cuda.current_device()
    (MC + "transformer.moe.router", "TopKRouter.__init__", ()),
    # token_dispatcher.py:425 creates the class-wide torch.cuda.Stream() for device-to-host copies
    (MC + "transformer.moe.token_dispatcher", "MoEAlltoAllTokenDispatcher.__init__", ()),
    # token_dispatcher.py:831-858 current_stream / stream / record_event around those copies
    (MC + "transformer.moe.token_dispatcher", "MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize", ()),
    # mappings.py:91/141/148/181 gather and reduce-scatter outputs, :442 all-to-all-v output on CUDA
    (MC + "tensor_parallel.mappings", "_gather_along_first_dim", ()),
    (MC + "tensor_parallel.mappings", "_reduce_scatter_along_first_dim", ()),
    (MC + "tensor_parallel.mappings", "_gather_along_last_dim", ()),
    (MC + "tensor_parallel.mappings", "_reduce_scatter_along_last_dim", ()),
    (MC + "tensor_parallel.mappings", "_AllToAll.forward", ()),
    # param_and_grad_buffer.py:702/719/725 DDP param and grad buffers on torch.cuda.current_device()
    (MC + "distributed.param_and_grad_buffer", "_ParamAndGradBuffer.__init__", ()),
    # optimizer.py:469/477/481 found_inf, overflow and scale tensors on device='cuda'
    (MC + "optimizer.optimizer", "MixedPrecisionOptimizer.__init__", ()),
    # optimizer.py:903 the fp32 optimizer's constant loss scale on device='cuda'
    (MC + "optimizer.optimizer", "FP32Optimizer.__init__", ()),
    # clip_grads.py:90/103/115 norm buffers on 'cuda'; utils.py:1029 the torch fallback of the
    # l2-norm kernel returns its result on 'cuda'
    (MC + "optimizer.optimizer", "get_grad_norm_fp32", (MC + "utils:local_multi_tensor_l2_norm",)),
    # schedules.py:573 total_num_tokens on device="cuda" (the model it calls is not redirected)
    (MC + "pipeline_parallel.schedules", "forward_backward_no_pipelining", ()),
    # timers.py:149/162 torch.cuda.synchronize() around every timer; :286 gathers times on CUDA
    (MC + "timers", "Timer.start", ()),
    (MC + "timers", "Timer.stop", ()),
    (MC + "timers", "Timers._get_elapsed_time_all_ranks", ()),
    # dist_checkpointing/strategies/filesystem_async.py:230 torch.cuda.synchronize() after staging, also
    # on the synchronous save path
    (MC + "dist_checkpointing.strategies.filesystem_async", "FileSystemWriterAsync.preload_tensors", ()),
    # dist_checkpointing/strategies/state_dict_saver.py:251 the failure flag broadcast from a CUDA tensor
    (MC + "dist_checkpointing.strategies.torch", "save_state_dict_async_finalize", ()),
    # dist_checkpointing/strategies/fully_parallel.py:272/281 torch.cuda.synchronize() after the exchange
    (MC + "dist_checkpointing.strategies.fully_parallel", "FullyParallelLoadStrategyWrapper.load", ()),
    # dist_checkpointing/exchange_utils.py:101-113, :329/339, :502 the fully parallel load exchanges the
    # shards each rank read through CUDA tensors (init_data("cuda"), empty(device="cuda"), .cuda())
    (MC + "dist_checkpointing.exchange_utils", "_get_empty_tensor_for_exchange",
     (MC + "dist_checkpointing.mapping:ShardedTensor.init_data",)),
    (MC + "dist_checkpointing.exchange_utils", "exchange_loaded_tensors_gather_rounds", ()),
    (MC + "dist_checkpointing.exchange_utils", "exchange_loaded_tensors_broadcast", ()),
    # megatron_parallel.py:617 init_ddp inside torch.cuda.stream(torch.cuda.Stream()), also for dense models
    (NL + "megatron_parallel", "MegatronParallel.init_model_parallel", ()),
    # llm/gpt/model/base.py:103 gpt_data_step moves the batch with .cuda(non_blocking=True)
    ("nemo.collections.llm.gpt.model.base", "GPTModel.data_step",
     ("nemo.collections.llm.gpt.model.base:gpt_data_step",)),
    # megatron_strategy.py:801/821/828/850 logged step, memory and loss: pin_memory=True, .to("cuda")
    (NL + "pytorch.strategies.megatron_strategy", "MegatronStrategy.training_step", ()),
    # megatron_strategy.py:881/888 the same for grad norm and zero count
    (NL + "pytorch.strategies.megatron_strategy", "MegatronStrategy.optimizer_step", ()),
    # pytorch/plugins/data_sampler.py:212 the logged global batch size: pin_memory=True, .to("cuda")
    (NL + "pytorch.plugins.data_sampler", "MegatronDataSampler.on_megatron_step_end", ()),
]


def _move_to_cpu_as_on_gpu(tensor, as_numpy=False, record_stream=False):
    """moe_utils.py:883 converts only CUDA tensors; CPU split sizes must become numpy too (all_to_all wants lists)."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """clip_grads.py:167 asserts 'torch.cuda.FloatTensor' grads; the same in-place scaling for CPU grads."""
    from megatron.core.utils import to_local_if_dtensor

    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [to_local_if_dtensor(getattr(p, attr)).detach() for p in parameters
             if getattr(p, attr, None) is not None]
    assert all(g.dtype in (torch.float32, torch.bfloat16) for g in grads), "gradients must be fp32 or bf16"
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _skip_empty_timer_gather(stock):
    """timers.py:296 all-gathers the timer table; NeMo's ProgressPrinter (progress_printer.py:155) calls it on
    rank 0 only, with no timers registered at the default log level. NCCL skips a gather of nothing; gloo
    still uses up a collective tag on rank 0 alone, so the next collective (a checkpoint save) hangs."""

    @functools.wraps(stock)
    def _get_elapsed_time_all_ranks(self, names, reset, barrier):
        if not names:
            return torch.zeros(torch.distributed.get_world_size(), 0)
        return stock(self, names, reset, barrier)

    return _get_elapsed_time_all_ranks


def _loaded_tensors_stay(ckpt):
    """io/pl.py:493 moves loaded CUDA tensors to the current CUDA device; CPU tensors are where they belong."""
    return ckpt


def _cpu_rng_tracker_class():
    """random.py:196-226 keeps named CUDA generator states; here the same named streams, on the CPU generator."""
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
    """megatron_init.py:238 seeds the tracker only if torch.cuda.device_count() > 0; seed it on CPU too."""

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
    if not hasattr(moe_utils, "te_general_gemm"):  # moe_utils.py:958 reads it; defined only when TE imports
        moe_utils.te_general_gemm = None
    _replace(MC + "transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu", _move_to_cpu_as_on_gpu)
    _replace(MC + "optimizer.optimizer", "clip_grad_by_total_norm_fp32", _clip_grad_by_total_norm_fp32)
    _replace(MC + "tensor_parallel.random", "CudaRNGStatesTracker", _cpu_rng_tracker_class())
    timers = importlib.import_module(MC + "timers").Timers
    timers._get_elapsed_time_all_ranks = _skip_empty_timer_gather(timers._get_elapsed_time_all_ranks)
    # io/pl.py:495 asserts torch.cuda.is_initialized() to move loaded tensors between CUDA devices
    _replace(NL + "io.pl", "_fix_tensors_device", _loaded_tensors_stay)
    megatron_init = importlib.import_module(NL + "megatron_init")
    megatron_init._set_random_seed = _seed_with_tracker(megatron_init._set_random_seed)
    _ENABLED = True
    return True


def cpu_config_overrides() -> dict:
    """TransformerConfig / GPTConfig fields to set on CPU: CPU initialization and no CUDA or TE fusions."""
    return dict(
        use_cpu_initialization=True,  # else weights are allocated on torch.cuda.current_device()
        apply_rope_fusion=False,  # needs TE (ValueError at config time without it)
        gradient_accumulation_fusion=False,  # needs the fused_weight_gradient_mlp_cuda extension
        masked_softmax_fusion=False,  # CUDA kernel
        bias_activation_fusion=False,  # torch.compile'd GPU fusion
        bias_dropout_fusion=False,
        persist_layer_norm=False,  # apex persistent layer norm
        cross_entropy_loss_fusion=False,  # torch.compile'd; needs a C++ toolchain on CPU, no gain
        moe_permute_fusion=False,  # TE permute; token_dispatcher.py:389 puts indices on CUDA
        moe_grouped_gemm=False,  # TE / grouped_gemm kernels; use SequentialMLP experts
    )


def cpu_strategy_kwargs() -> dict:
    """MegatronStrategy arguments for CPU: synchronous checkpoint save (the async path needs CUDA streams)."""
    return dict(ckpt_async_save=False)
