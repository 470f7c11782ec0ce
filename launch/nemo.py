"""Launch a recipe through NeMo-Run: ``torchrun -m launch.train`` under a local or Slurm executor.

    python -m launch.nemo --recipe tiny --executor local --nproc-per-node 2 schedule.steps=2
    python -m launch.nemo --recipe llama3_70b_to_8b --executor slurm --nodes 2 --gpus-per-node 8 \\
        --account A --partition P --time 04:00:00 --container-image IMG --container-mounts /data:/data
    python -m launch.nemo --recipe llama3_70b_to_8b --executor slurm --nodes 2 --dryrun   # writes the sbatch script

Run it from the repository root. The recipe and its ``key=value`` overrides are checked before anything is
launched (exit 2 with the message). ``--executor local`` runs torchrun on this machine from the current
directory. ``--executor slurm`` submits from this machine (a login node: ``run.LocalTunnel``); the job runs
a ``git archive`` of HEAD, so commit first: uncommitted changes are not shipped. ``--dryrun`` submits
nothing: local prints the torchrun command, slurm writes the sbatch script and prints its path (no Slurm
installation needed). Otherwise it waits for the job and exits 0 when it succeeded, 1 when it failed or
its status is unknown (NeMo-Run reads Slurm status through ``sacct``, which needs slurmdbd), printing where
the logs are. Experiment folders go under ``--job-dir`` (default ``$NEMORUN_HOME``, ``~/.nemo_run``).
"""
import argparse
import os
import sys

from recipes import absolute_spec, get_recipe, recipe_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_DEFAULT = 8  # GPUs per node requested for GPU recipes when --gpus-per-node is not given


def parse(argv=None) -> argparse.Namespace:
    parser = recipe_parser(__doc__)
    parser.add_argument("--executor", choices=("local", "slurm"), default="local")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, help=f"default {GPU_DEFAULT}, 0 for recipes with gpu='cpu'")
    parser.add_argument("--nproc-per-node", type=int,
                        help="torchrun processes per node; default the GPUs per node, or tensor x pipeline on CPU")
    parser.add_argument("--dryrun", action="store_true", help="submit nothing; slurm: write the sbatch script")
    parser.add_argument("--job-dir", help="where experiment folders go (default $NEMORUN_HOME or ~/.nemo_run)")
    parser.add_argument("--account")
    parser.add_argument("--partition")
    parser.add_argument("--time", default="04:00:00", help="Slurm time limit (default %(default)s)")
    parser.add_argument("--container-image")
    parser.add_argument("--container-mounts", default="", help="comma-separated src:dst mounts for the container")
    return parser.parse_args(argv)


def validate(args: argparse.Namespace):
    """The recipe's RunConfig with the overrides applied and the process layout resolved onto ``args``;
    raises ValueError naming what is wrong."""
    config = get_recipe(args.recipe, args.overrides)
    if args.gpus_per_node is None:
        args.gpus_per_node = 0 if config.gpu == "cpu" else GPU_DEFAULT
    if args.nproc_per_node is None:
        args.nproc_per_node = args.gpus_per_node or config.min_world_size
    from tropd_megatron.validate import validate

    validate(config, args.nodes * args.nproc_per_node)
    return config


def check_memory(config, gpus: int) -> None:
    """Refuse a GPU layout that cannot fit before queueing it (raise ValueError); CPU recipes skip it."""
    if config.gpu == "cpu":
        return
    from launch.plan import check_fits

    check_fits(config, gpus)


def train_script(args: argparse.Namespace):
    """The task: ``torchrun ... -m launch.train --recipe NAME overrides...`` (the executor adds torchrun).
    A recipe of the user's own must be importable where the job runs (a file on a shared file
    system, or a module on the job's PYTHONPATH)."""
    import nemo_run as run

    return run.Script(path="launch.train", args=["--recipe", absolute_spec(args.recipe), *args.overrides],
                      entrypoint="python", m=True)


def experiments_dir(args: argparse.Namespace) -> str:
    from nemo_run.config import get_nemorun_home

    return os.path.abspath(args.job_dir or get_nemorun_home())


def local_executor(args: argparse.Namespace):
    import nemo_run as run

    # torchrun from this interpreter's environment, and the repository importable from any cwd
    env = {"PATH": os.path.dirname(sys.executable),
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    return run.LocalExecutor(ntasks_per_node=args.nproc_per_node, launcher="torchrun", env_vars=env)


def slurm_executor(args: argparse.Namespace):
    import nemo_run as run

    return run.SlurmExecutor(
        account=args.account, partition=args.partition, time=args.time, job_name_prefix="tropd.",
        nodes=args.nodes, ntasks_per_node=args.nproc_per_node,  # torchrun launcher: 1 task/node, P processes
        gpus_per_node=args.gpus_per_node or None,
        container_image=args.container_image,
        container_mounts=[m for m in args.container_mounts.split(",") if m],
        tunnel=run.LocalTunnel(job_dir=os.path.join(experiments_dir(args), "experiments")),
        packager=run.GitArchivePackager(basepath=REPO),
        launcher="torchrun",
    )


def build_experiment(args: argparse.Namespace):
    """A NeMo-Run experiment with the chosen executor; add ``train_script(args)`` inside ``with exp:``
    (NeMo-Run refuses ``add`` outside its context)."""
    import nemo_run as run

    executor = local_executor(args) if args.executor == "local" else slurm_executor(args)
    return run.Experiment(f"tropd-{args.recipe}", executor=executor, base_dir=experiments_dir(args),
                          enable_goodbye_message=False)


def dryrun(args: argparse.Namespace) -> int:
    """Print what would run; for Slurm also write the sbatch script and print its path."""
    with build_experiment(args) as exp:
        exp.add(train_script(args), name="train")
        exp.dryrun(log=True, delete_exp_dir=False)
        executor = exp.jobs[0].executor
        if args.executor == "slurm":  # NeMo-Run wrote the script next to the job folder
            path = os.path.join(executor.experiment_dir, f"{executor.job_name}_sbatch.sh")
            if not os.path.isfile(path):
                raise RuntimeError(f"NeMo-Run wrote no sbatch script at {path}")
            print(f"sbatch script: {path}", flush=True)
    return 0


def run_and_report(args: argparse.Namespace) -> int:
    """Run the task, wait for it (NeMo-Run waits on leaving the context) and report its final state:
    ``exp.run()`` returns normally whatever the job did."""
    from torchx.specs import AppState

    with build_experiment(args) as exp:
        exp.add(train_script(args), name="train", tail_logs=True)
        exp.run()
    job = exp.jobs[0]
    state = job.state
    logs = job.executor.job_dir
    if state == AppState.SUCCEEDED:
        print(f"job {job.handle} succeeded; logs under {logs}", flush=True)
        return 0
    hint = {AppState.FAILED: "; an exit code 75 in them means preempted after a checkpoint: run again to resume",
            AppState.UNKNOWN: "; NeMo-Run reads Slurm job status through sacct, which needs slurmdbd"}.get(state, "")
    print(f"error: job {job.handle} ended {state.name}; logs under {logs}{hint}", file=sys.stderr, flush=True)
    return 1


def main(argv=None) -> int:
    args = parse(argv)
    try:
        check_memory(validate(args), args.nodes * args.nproc_per_node)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return dryrun(args) if args.dryrun else run_and_report(args)


if __name__ == "__main__":
    sys.exit(main())
