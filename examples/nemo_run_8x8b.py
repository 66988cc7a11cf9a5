"""The 8x8B upcycling job through NeMo-Run: ``recipes/llama3_8x8b_upcycle.py``'s ``run.Partial(llm.train, ...)`` on a
Slurm cluster (pyxis/enroot) in the NGC NeMo container, launched by ``run.SlurmExecutor``.

  python examples/nemo_run_8x8b.py --dry-run                 # print the sbatch script NeMo-Run would submit; no job
  python examples/nemo_run_8x8b.py --account ACC --partition batch --host login.cluster --user me \\
      --job-dir /lustre/me/nemo_run --model-dir /lustre/models/Meta-Llama-3-8B --data-dir /lustre/data \\
      --results-dir /lustre/me/results                        # submit (through an SSH tunnel to the login node)

Nodes, GPUs per node and the layout come from the recipe (conf/parallel/h100_64gpu_8x8b.yaml: 8 x 8 H100): one
Slurm task per GPU, ranks from ``SLURM_*`` (Lightning's SLURMEnvironment, NeMo's default on Slurm), no torchrun.
The code reaches the nodes the NeMo-Run way: ``GitArchivePackager`` ships this repository's committed HEAD to the
job directory, mounted at ``/nemo_run/code``, which goes on ``PYTHONPATH`` (``nemo_upcycle`` is pure Python).
Container: see ``IMAGE`` and examples/ngc_slurm_8x8b.sh for which NeMo / megatron-core it ships.

``--dry-run`` works offline on any machine: a ``run.LocalTunnel`` and a temporary NeMo-Run home, both removed
afterwards, so nothing is submitted and nothing is left behind.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `recipes` is a top-level package of this checkout, not installed
    sys.path.insert(0, str(REPO))

NAME = "llama3_8x8b_upcycle"
IMAGE = "nvcr.io/nvidia/nemo:26.02"  # NeMo 2.7.0; the reasons are in examples/ngc_slurm_8x8b.sh
MODEL, DATA, RESULTS = "/models/dense", "/data", "/results"  # mount points inside the container


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="print the sbatch script NeMo-Run would submit; submit nothing")
    p.add_argument("--account", default=os.environ.get("SLURM_ACCOUNT", "my_account"))
    p.add_argument("--partition", default=os.environ.get("SLURM_PARTITION", "batch"))
    p.add_argument("--time", default="04:00:00",
                   help="Slurm time limit of one job (training resumes from the last checkpoint)")
    p.add_argument("--image", default=IMAGE)
    p.add_argument("--host", default=None,
                   help="login node for an SSH tunnel (default: a local tunnel, run on the login node)")
    p.add_argument("--user", default=os.environ.get("USER", ""))
    p.add_argument("--job-dir", default=None, help="NeMo-Run job directory on the cluster's shared filesystem")
    p.add_argument("--model-dir", default="/lustre/models/Meta-Llama-3-8B",
                   help="cluster path of the dense HF Llama 3 8B")
    p.add_argument("--data-dir", default="/lustre/data", help="cluster directory holding the training text")
    p.add_argument("--data-files", default="train.jsonl", help="comma-separated files in --data-dir (text or jsonl)")
    p.add_argument("--results-dir", default="/lustre/results", help="cluster directory for logs and checkpoints")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the recipe, e.g. trainer.max_steps=100")
    return p.parse_args(argv)


def make_partial(a: argparse.Namespace):
    from nemo_upcycle.config.compose import overrides_from_kwargs
    from nemo_upcycle.engine.catalog import partial

    files = [f"{DATA}/{f.strip()}" for f in a.data_files.split(",") if f.strip()]
    overrides = overrides_from_kwargs({"model.source": MODEL, "data.paths": files}) + list(a.overrides)
    return partial(NAME, overrides, out_dir=f"{RESULTS}/{NAME}")


def make_executor(a: argparse.Namespace, job_dir: str):
    import nemo_run as run

    from nemo_upcycle.config.compose import compose

    p = compose(NAME, a.overrides).parallel
    if a.host and not a.dry_run:
        tunnel = run.SSHTunnel(host=a.host, user=a.user, job_dir=job_dir)
    else:
        tunnel = run.LocalTunnel(job_dir=job_dir)
    return run.SlurmExecutor(
        account=a.account, partition=a.partition, time=a.time,
        nodes=p.num_nodes, ntasks_per_node=p.devices, gpus_per_node=p.devices, exclusive=True, mem="0",
        container_image=a.image,
        container_mounts=[f"{a.model_dir}:{MODEL}:ro", f"{a.data_dir}:{DATA}:ro", f"{a.results_dir}:{RESULTS}"],
        env_vars={"PYTHONPATH": "/nemo_run/code", "CUDA_DEVICE_MAX_CONNECTIONS": "1",
                  "TORCH_NCCL_AVOID_RECORD_STREAMS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        packager=run.GitArchivePackager(), tunnel=tunnel,
    )


@contextmanager
def _in_repo():
    """GitArchivePackager archives the git repository of the current directory: this one."""
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(cwd)


def dry_run(partial, executor) -> str:
    """What ``run.run(partial, executor=executor, dryrun=True)`` does (an Experiment with one task, dry-run), returning
    the sbatch command and script NeMo-Run would submit instead of logging them through its 80-column console."""
    import nemo_run as run

    with run.Experiment(NAME, executor=executor, log_level="WARN") as exp:
        exp.add(partial, name=NAME, tail_logs=False)
        exp.dryrun(log=False)
        info = getattr(exp.jobs[0], "_dryrun_info", None)
    if info is None:  # another NeMo-Run version: let it print the script itself
        run.run(partial, executor=executor, name=NAME, dryrun=True)
        return ""
    return str(info)


def main(argv=None) -> int:
    a = parse_args(argv)
    import nemo_run as run
    from nemo_run import config as run_config

    from nemo_upcycle.errors import UpcycleError

    try:
        partial = make_partial(a)
        if a.dry_run:
            home = run_config.get_nemorun_home()
            with tempfile.TemporaryDirectory(prefix="nemo_run_dryrun_") as tmp, _in_repo():
                run_config.set_nemorun_home(tmp)
                try:
                    print(dry_run(partial, make_executor(a, job_dir=os.path.join(tmp, "jobs"))))
                finally:
                    run_config.set_nemorun_home(home)
            return 0
        if not a.job_dir:
            raise UpcycleError("--job-dir is required to submit: "
                               "a NeMo-Run job directory on the cluster's shared filesystem.")
        with _in_repo():
            run.run(partial, executor=make_executor(a, a.job_dir), name=NAME, detach=True)
        return 0
    except UpcycleError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
