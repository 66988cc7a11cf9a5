"""The supported NeMo / megatron-core stacks and, per stack, the CUDA-only call sites ``engine/cpu.py`` scopes.

Two stacks are supported (each installed by ``scripts/setup.sh [--stack NAME]`` from requirements/[NAME/]):
``default`` (nemo-toolkit 2.7.3 + megatron-core 0.15.3) and ``ngc-26.02`` (nemo-toolkit 2.7.0 + megatron-core
0.16.0, what nvcr.io/nvidia/nemo:26.02 ships: requirements/ngc-26.02/constraints.txt names the source). Anything
else is refused in one line (``installed_stack``): these sites were read from those releases' sources only.

Each comment cites the CUDA-only lines as ``file:<0.15.3 line>|<0.16.0 line>`` under megatron/core/ (one number where
the line did not move); NeMo lines are under nemo/ and the same in both stacks (nemo/lightning and
nemo/collections/llm are unchanged from 2.7.0 to 2.7.3 but for the restricted unpickler of io/mixin.py).
"""

from __future__ import annotations

import importlib

from nemo_upcycle.errors import UpcycleError

VERSION_MODULES = {"nemo-toolkit": "nemo.package_info", "megatron-core": "megatron.core.package_info"}
STACKS = {  # name -> the versions it installs (``scripts/setup.sh --stack NAME``; requirements/)
    "default": {"nemo-toolkit": "2.7.3", "megatron-core": "0.15.3"},
    "ngc-26.02": {"nemo-toolkit": "2.7.0", "megatron-core": "0.16.0"},
}


def installed_versions() -> dict[str, str]:
    """The installed version of each package in ``VERSION_MODULES`` (UpcycleError naming the fix if one is missing)."""
    out = {}
    for dist, module in VERSION_MODULES.items():
        try:
            out[dist] = importlib.import_module(module).__version__
        except ImportError:
            raise UpcycleError(f"{dist} is not installed; install a supported stack: bash scripts/setup.sh "
                               f"[--stack ngc-26.02] (or pip install '.[nemo]')") from None
    return out


def installed_stack() -> str:
    """The name of the installed stack in ``STACKS``; UpcycleError (one line) on any other combination."""
    have = installed_versions()
    for name, versions in STACKS.items():
        if versions == have:
            return name
    known = "; ".join(f"{n}: " + " + ".join(f"{d}=={v}" for d, v in vs.items()) for n, vs in STACKS.items())
    found = " + ".join(f"{d}=={v}" for d, v in have.items())
    raise UpcycleError(f"the CPU support is tested on these NeMo / megatron-core stacks only ({known}), found {found}; "
                       f"install one (bash scripts/setup.sh [--stack ngc-26.02]; PIN_STACK=1 in the NGC job) or run "
                       f"on a CUDA machine")


MC, NL, DC = "megatron.core.", "nemo.lightning.", "megatron.core.dist_checkpointing."
_ROPE = MC + "models.common.embeddings.rotary_pos_embedding"

# (module, function, helpers it calls whose torch calls are redirected too) in every stack; each comment names the
# CUDA-only lines and what they do.
_SCOPED = [
    # utils.py:535|631 the shared attention matmul buffer on torch.cuda.current_device()
    (MC + "utils", "GlobalMemoryBuffer.get_tensor", ()),
    # transformer/moe/router.py:86/88|90/92 moves the router weight and bias to current_device() before gating
    (MC + "transformer.moe.router", "Router.gating", ()),
    # transformer/moe/router.py:165-194|169-198 expert-bias and global-aux-loss buffers on current_device()
    (MC + "transformer.moe.router", "TopKRouter.__init__", ()),
    # transformer/moe/token_dispatcher.py:425|440 the class-wide torch.cuda.Stream() for device-to-host copies,
    # :831-858|871-898 current_stream / stream / record_event around those copies
    (MC + "transformer.moe.token_dispatcher", "MoEAlltoAllTokenDispatcher.__init__", ()),
    (MC + "transformer.moe.token_dispatcher", "MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize", ()),
    # tensor_parallel/mappings.py:91/141/148/181 gather and reduce-scatter outputs and :442 the all-to-all-v
    # output on current_device() (the allgather and alltoall dispatchers at EP > 1; _reduce_scatter_along_last_dim
    # holds none: it calls the first-dim one)
    *[(MC + "tensor_parallel.mappings", fn, ()) for fn in (
        "_gather_along_first_dim", "_reduce_scatter_along_first_dim", "_gather_along_last_dim", "_AllToAll.forward")],
    # tensor_parallel/layers.py:544/589/599|552/597/607 (sequence parallelism) the reduce-scatter output of the input
    # gradient and the weight-gradient buffers on current_device()
    (MC + "tensor_parallel.layers", "LinearWithGradAccumulationAndAsyncCommunication.backward", ()),
    # distributed/param_and_grad_buffer.py:702/719/725|783/800/806 DDP param and grad buffers on current_device()
    (MC + "distributed.param_and_grad_buffer", "_ParamAndGradBuffer.__init__", ()),
    # optimizer/optimizer.py:469/477/481|473/481/485 found_inf, overflow and scale tensors, :903|907 the fp32
    # optimizer's loss scale, all on device='cuda'
    (MC + "optimizer.optimizer", "MixedPrecisionOptimizer.__init__", ()),
    (MC + "optimizer.optimizer", "FP32Optimizer.__init__", ()),
    # optimizer/clip_grads.py:90/103/115 norm buffers on 'cuda'; utils.py:1029|1207 the torch fallback of the
    # l2-norm kernel returns its result on 'cuda'
    (MC + "optimizer.optimizer", "get_grad_norm_fp32", (MC + "utils:local_multi_tensor_l2_norm",)),
    # pipeline_parallel/schedules.py:573|596, :963|983, :2114|2138 total_num_tokens on "cuda" in each schedule (the
    # model it runs is not redirected)
    *[(MC + "pipeline_parallel.schedules", fn, ()) for fn in (
        "forward_backward_no_pipelining", "forward_backward_pipelining_with_interleaving",
        "forward_backward_pipelining_without_interleaving")],
    # pipeline_parallel/p2p_communication.py:190-202 shape buffers, :313/321 receive buffers on current_device(),
    # :242/398 torch.cuda.synchronize() after the exchange
    (MC + "pipeline_parallel.p2p_communication", "P2PCommunicator._communicate_shapes", ()),
    (MC + "pipeline_parallel.p2p_communication", "P2PCommunicator._communicate", ()),
    # timers.py:149/162|152/165 torch.cuda.synchronize() around every timer, :286|303 the gathered times on CUDA
    (MC + "timers", "Timer.start", ()),
    (MC + "timers", "Timer.stop", ()),
    (MC + "timers", "Timers._get_elapsed_time_all_ranks", ()),
    # dist_checkpointing/strategies/filesystem_async.py:230 synchronize() after staging (also when synchronous)
    (DC + "strategies.filesystem_async", "FileSystemWriterAsync.preload_tensors", ()),
    # dist_checkpointing/strategies/state_dict_saver.py:252 the save-failure flag broadcast from CUDA
    (DC + "strategies.torch", "save_state_dict_async_finalize", ()),
    # dist_checkpointing/strategies/fully_parallel.py:272/281 synchronize() after the load exchange;
    # exchange_utils.py:101-113|98-110, :329/339|326/336, :502|499 the ranks exchange the shards each one read as
    # CUDA tensors (mapping.py:369|260 ShardedTensor.init_data on current_device())
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

# The sites that differ between the stacks.
_PER_STACK = {
    # models/common/embeddings/rotary_pos_embedding.py:164 (0.15.3) RotaryEmbedding.forward moves inv_freq to
    # current_device() on first use ...
    "default": [(_ROPE, "RotaryEmbedding.forward", ())],
    # ... :162 (0.16.0) in get_emb, which the (lru-cached) forward calls: both are redirected
    "ngc-26.02": [(_ROPE, "RotaryEmbedding.forward", (_ROPE + ":RotaryEmbedding.get_emb",))],
}


def scoped_sites(stack: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """Every (module, function, callees) that ``engine/cpu.py`` redirects to the CPU on ``stack``."""
    return [*_PER_STACK[stack], *_SCOPED]


def main() -> int:
    """``python -m nemo_upcycle.engine.cpu_sites``: print the installed stack (exit 0) or why it is not a tested one
    (one line, exit 2); the NGC job (examples/ngc_slurm_8x8b.sh) runs it to choose between the container's stack and
    the default stack's pins."""
    import sys

    try:
        name = installed_stack()
    except UpcycleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"stack {name}: " + " + ".join(f"{d}=={v}" for d, v in STACKS[name].items()) + " (tested)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
