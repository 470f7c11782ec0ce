"""Launch a recipe through NeMo-Run under a local or Slurm executor, as ``torchrun -m launch.train`` (a
``run.Script``, the default) or as an editable NeMo-Run configuration (``--task partial``: a ``run.Partial``
of ``launch.nemo.train`` with the recipe's RunConfig as a ``run.Config``, run by NeMo-Run's runner under torchrun).

    python -m launch.nemo --recipe tiny --executor local --nproc-per-node 2 schedule.steps=2
    python -m launch.nemo --recipe tiny --nproc-per-node 2 --task partial schedule.steps=2 'optim.lr*=2'
    python -m launch.nemo --recipe llama3_70b_to_8b --executor slurm --nodes 2 --gpus-per-node 8 \\
        --account A --partition P --time 04:00:00 --container-image IMG --container-mounts /data:/data
    python -m launch.nemo --recipe llama3_70b_to_8b --executor slurm --nodes 2 --dryrun   # writes the sbatch script

Run it from the repository root. The recipe and its ``key=value`` overrides are checked before anything is
launched (exit 2 with the message). With ``--task script`` the overrides are launch.train's (OmegaConf dotted
keys); with ``--task partial`` they are NeMo-Run's command-line syntax applied to the ``run.Config`` (the
same dotted keys, ``cfg.`` prefix optional, plus ``key*=2``, ``key+=1``, ``key=None``, ``key=factory``), and
the job receives the resolved configuration, serialized (its ``*_config.yaml`` is kept in the job folder).
``--executor local`` runs torchrun on this machine from the current directory. ``--executor slurm`` submits
from this machine (a login node: ``run.LocalTunnel``); the job runs a ``git archive`` of HEAD, so commit first:
uncommitted changes are not shipped. ``--dryrun`` submits nothing: local prints the torchrun command, slurm
writes the sbatch script and prints its path (no Slurm installation needed). Otherwise it waits for the job and
exits 0 when it succeeded, 1 when it failed or its status is unknown (NeMo-Run reads Slurm status through
``sacct``, which needs slurmdbd), printing where the logs are. Experiment folders go under ``--job-dir``
(default ``$NEMORUN_HOME``, ``~/.nemo_run``).

In Python: ``recipe_partial(NAME, overrides)`` is the ``run.Partial`` (``recipe_config`` its ``run.Config``) to
edit, ``clone()`` and add to a ``run.Experiment`` with ``local_executor(...)`` / ``slurm_executor(...)``;
``check(task, world)`` runs the checks above and ``report(exp)`` gives the exit code from the jobs' final states
(docs/launching.md has a sweep; a file that launches a ``run.Partial`` needs an ``if __name__ == "__main__":``
guard).
"""
import argparse
import os
import sys

from recipes import absolute_spec, get_recipe, recipe_parser
from tropd_megatron.run_config import RunConfig
from tropd_megatron import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_DEFAULT = 8  # GPUs per node requested for GPU recipes when --gpus-per-node is not given
TASKS = ("script", "partial")
HINTS = {"FAILED": "; an exit code 75 in them means preempted after a checkpoint: run again to resume",
         "UNKNOWN": "; NeMo-Run reads Slurm job status through sacct, which needs slurmdbd"}  # by final job state


def parse(argv=None) -> argparse.Namespace:
    parser = recipe_parser(__doc__)
    parser.add_argument("--executor", choices=("local", "slurm"), default="local")
    parser.add_argument("--task", choices=TASKS, default="script",
                        help="script: torchrun -m launch.train (default); partial: a run.Partial of launch.nemo.train "
                             "with the recipe as a run.Config, overrides in NeMo-Run's syntax")
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
    return parser.parse_intermixed_args(argv)  # options may follow the overrides


# ---- the recipe as an editable NeMo-Run configuration -------------------------------------------------------

def train(cfg: RunConfig) -> None:
    """The training entry point of ``recipe_partial``: what NeMo-Run's runner calls on every torchrun rank.
    launch.train's checks first (the layout at this world size; on GPU recipes the memory plan), then
    ``tropd_megatron.train.train(cfg)``. Exits as launch.train does: 2 bad configuration, 1 a run error, 75
    preempted after writing a checkpoint."""
    from launch import run_main

    code = run_main(lambda _: _checked_train(cfg))
    if code:
        sys.exit(code)


def _checked_train(cfg: RunConfig) -> None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    check(cfg, world)  # before anything is imported, loaded or built
    from tropd_megatron.train import train as run_training

    run_training(cfg)


def _entry():
    """``train`` as ``launch.nemo.train`` even when this file runs as ``__main__``: NeMo-Run serializes the
    function by module and name, and the job imports it from there."""
    import importlib

    return importlib.import_module("launch.nemo").train


def recipe_config(spec: str, overrides=()):
    """Recipe ``spec``'s RunConfig as a ``run.Config[RunConfig]``, every nested dataclass a nested ``run.Config``,
    with NeMo-Run ``overrides`` (see ``apply_nemo_overrides``) applied; ``fdl.build`` gives the RunConfig back
    (running the dataclasses' checks)."""
    from fiddle.experimental.dataclasses import convert_dataclasses_to_configs

    config = _as_run_configs(convert_dataclasses_to_configs(get_recipe(spec), allow_post_init=True))
    return apply_nemo_overrides(config, overrides)


def recipe_partial(spec: str, overrides=()):
    """``run.Partial(launch.nemo.train, cfg=recipe_config(spec, overrides))``: the task to add to a
    ``run.Experiment`` (its ``cfg`` is the editable configuration; overrides may be written ``cfg.KEY=...``)."""
    import nemo_run as run

    return run.Partial(_entry(), cfg=recipe_config(spec, overrides))


def _as_run_configs(config):
    """``config`` with it and every nested ``fdl.Config`` cast to ``run.Config`` (clone, broadcast, walk...)."""
    import fiddle as fdl
    import nemo_run as run

    config = fdl.cast(run.Config, config)
    for name, value in list(config.__arguments__.items()):
        if isinstance(value, fdl.Config):
            setattr(config, name, _as_run_configs(value))
    return config


def apply_nemo_overrides(buildable, overrides):
    """``buildable`` (a ``recipe_config``, or a ``recipe_partial``: then keys may start with ``cfg.``) with
    NeMo-Run command-line overrides applied in place and returned: ``key=value`` (parsed to the field's type;
    ``None``/``null``, lists, quoted strings), ``key+=1``, ``key*=2``, ``key-=``, ``key/=``, and for a nested
    configuration ``key=factory``, ``key=package.module.function`` or ``key=function(arg=1)`` (a ``run.cli.factory``
    or an importable function returning a ``run.Config`` or a dataclass). Raises ValueError naming an unknown key,
    a value that does not parse or an operation that does not apply."""
    import dataclasses
    import typing

    import fiddle as fdl
    from nemo_run.cli.cli_parser import CLIException, Operation, PythonicParser, parse_factory, parse_value

    config = buildable.cfg if isinstance(buildable, fdl.Partial) else buildable
    parser = PythonicParser()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (for example schedule.steps=2)")
        try:
            ((key, (op, value)),) = parser.parse(item).items()
        except (CLIException, ValueError) as e:
            raise ConfigError(f"override {item!r}: {e}") from None
        parts = key.removeprefix("cfg.").split(".")
        node, done = config, []
        for part in parts:
            cls = node.__fn_or_cls__
            names = [f.name for f in dataclasses.fields(cls) if f.init] if dataclasses.is_dataclass(cls) else []
            if part not in names:
                where = ".".join(done)
                raise ConfigError(f"unknown override key {'.'.join(parts)!r}; valid keys"
                                 f"{' under ' + where if where else ''}: "
                                 + ", ".join(".".join([*done, n]) for n in names))
            if len(done) == len(parts) - 1:
                break
            done.append(part)
            node = getattr(node, part)
            if not isinstance(node, fdl.Buildable):
                raise ConfigError(f"override {item!r}: {'.'.join(done)} is {node!r}, not a configuration")
        name = parts[-1]
        # the field's type: this project's annotations are strings (``from __future__ import annotations``),
        # which NeMo-Run's own parse_cli_args cannot read, so they are resolved here
        annotation = _typing_union(typing.get_type_hints(cls)[name])
        try:
            if op == Operation.ASSIGN and _dataclass_type(annotation) and value.lower() not in ("none", "null"):
                parsed = parse_factory(cls, name, annotation, value)
                if dataclasses.is_dataclass(parsed) and not isinstance(parsed, type):
                    parsed = _as_run_configs(fdl.cast(fdl.Config, _convert(parsed)))
            else:
                parsed = parse_value(value, annotation)
            if op != Operation.ASSIGN:
                parsed = parser.apply_operation(op, getattr(node, name), parsed)
        except CLIException as e:
            raise ConfigError(f"override {item!r}: {getattr(e, 'reason', None) or e}") from None
        except (ValueError, TypeError) as e:
            raise ConfigError(f"override {item!r}: {e}") from None
        setattr(node, name, parsed)
    return buildable


def _typing_union(annotation):
    """``annotation`` with PEP 604 unions (``int | None``, which NeMo-Run's parser does not know) written as
    ``typing.Union``, also inside generics."""
    import types
    import typing

    args = typing.get_args(annotation)
    if not args:
        return annotation
    args = tuple(_typing_union(a) for a in args)
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        return typing.Union[args]
    try:
        return origin[args]
    except TypeError:
        return annotation


def _dataclass_type(annotation):
    import dataclasses
    import typing

    return any(dataclasses.is_dataclass(t) for t in (annotation, *typing.get_args(annotation)))


def _convert(instance):
    from fiddle.experimental.dataclasses import convert_dataclasses_to_configs

    return convert_dataclasses_to_configs(instance, allow_post_init=True)


def check(task, world: int) -> RunConfig:
    """The RunConfig of ``task`` (a ``recipe_partial``, a ``recipe_config`` or a RunConfig), built and checked as
    the launchers check it before anything runs: its layout at ``world`` processes and, on a GPU recipe, the
    memory plan. Raises ValueError naming what is wrong."""
    import fiddle as fdl

    config = task
    if isinstance(task, fdl.Buildable):
        config = fdl.build(task.cfg if isinstance(task, fdl.Partial) else task)
    if not isinstance(config, RunConfig):
        raise ConfigError(f"expected a RunConfig, a run.Config of one or a run.Partial of launch.nemo.train, "
                         f"not {type(config).__name__}")
    from tropd_megatron.validate import validate as validate_layout

    validate_layout(config, world)
    check_memory(config, world)
    return config


# ---- the command line --------------------------------------------------------------------------------------

def validate(args: argparse.Namespace, config: RunConfig = None):
    """The recipe's RunConfig with the overrides applied (or ``config``, the one a ``--task partial`` built) and
    the process layout resolved onto ``args``; raises ValueError naming what is wrong."""
    if config is None:
        config = get_recipe(args.recipe, args.overrides)
    if args.gpus_per_node is None:
        args.gpus_per_node = 0 if config.gpu == "cpu" else GPU_DEFAULT
    if args.nproc_per_node is None:
        args.nproc_per_node = args.gpus_per_node or config.min_world_size
    from tropd_megatron.validate import validate

    validate(config, args.nodes * args.nproc_per_node)
    return config


def check_memory(config, gpus: int) -> None:
    """Refuse a GPU layout that cannot fit before queueing it (raise ConfigError); CPU recipes skip it."""
    if config.gpu == "cpu":
        return
    from launch.plan import check_fits

    check_fits(config, gpus)


def prepare(args: argparse.Namespace):
    """(the task to launch, its RunConfig), checked as ``check`` does: a ``run.Script`` of launch.train, or
    with ``--task partial`` the ``recipe_partial`` with the overrides; raises ValueError naming what is wrong."""
    if args.task == "partial":
        import fiddle as fdl

        task = recipe_partial(args.recipe, args.overrides)
        config = validate(args, fdl.build(task.cfg))
    else:
        config = validate(args)
        task = train_script(args)
    check_memory(config, args.nodes * args.nproc_per_node)
    return task, config


def train_script(args: argparse.Namespace):
    """The task: ``torchrun ... -m launch.train --recipe NAME overrides...`` (the executor adds torchrun).
    A recipe of the user's own must be importable where the job runs (a file on a shared file
    system, or a module on the job's PYTHONPATH)."""
    import nemo_run as run

    return run.Script(path="launch.train", args=["--recipe", absolute_spec(args.recipe), *args.overrides],
                      entrypoint="python", m=True)


def experiments_dir(job_dir: str = None) -> str:
    from nemo_run.config import get_nemorun_home

    return os.path.abspath(job_dir or get_nemorun_home())


def local_executor(nproc_per_node: int = 1):
    """torchrun with ``nproc_per_node`` processes on this machine, from this interpreter's environment, with
    the repository importable from any working directory (NeMo-Run's runner imports ``launch.nemo.train``)."""
    import nemo_run as run

    env = {"PATH": os.path.dirname(sys.executable),
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    return run.LocalExecutor(ntasks_per_node=nproc_per_node, launcher="torchrun", env_vars=env)


def slurm_executor(*, nodes: int = 1, nproc_per_node: int = GPU_DEFAULT, gpus_per_node: int = GPU_DEFAULT,
                   account: str = None, partition: str = None, time: str = "04:00:00", container_image: str = None,
                   container_mounts=(), job_dir: str = None):
    """torchrun on ``nodes`` Slurm nodes (one task per node, ``nproc_per_node`` processes each), submitted from
    this machine, running a ``git archive`` of the repository's HEAD."""
    import nemo_run as run

    return run.SlurmExecutor(
        account=account, partition=partition, time=time, job_name_prefix="tropd.",
        nodes=nodes, ntasks_per_node=nproc_per_node,  # torchrun launcher: 1 task/node, P processes
        gpus_per_node=gpus_per_node or None,
        container_image=container_image,
        container_mounts=list(container_mounts),
        tunnel=run.LocalTunnel(job_dir=os.path.join(experiments_dir(job_dir), "experiments")),
        packager=run.GitArchivePackager(basepath=REPO),
        launcher="torchrun",
    )


def executor(args: argparse.Namespace):
    """The executor the command line asks for (``validate`` has resolved the process layout onto ``args``)."""
    if args.executor == "local":
        return local_executor(args.nproc_per_node)
    return slurm_executor(nodes=args.nodes, nproc_per_node=args.nproc_per_node, gpus_per_node=args.gpus_per_node,
                          account=args.account, partition=args.partition, time=args.time,
                          container_image=args.container_image,
                          container_mounts=[m for m in args.container_mounts.split(",") if m], job_dir=args.job_dir)


def build_experiment(args: argparse.Namespace):
    """A NeMo-Run experiment with the chosen executor; add the task inside ``with exp:`` (NeMo-Run refuses
    ``add`` outside its context)."""
    import nemo_run as run

    return run.Experiment(f"tropd-{args.recipe}", executor=executor(args), base_dir=experiments_dir(args.job_dir),
                          enable_goodbye_message=False)


def dryrun(args: argparse.Namespace, task) -> int:
    """Print what would run; for Slurm also write the sbatch script and print its path."""
    with build_experiment(args) as exp:
        exp.add(task, name="train")
        exp.dryrun(log=True, delete_exp_dir=False)
        job_executor = exp.jobs[0].executor
        if args.executor == "slurm":  # NeMo-Run wrote the script next to the job folder
            path = os.path.join(job_executor.experiment_dir, f"{job_executor.job_name}_sbatch.sh")
            if not os.path.isfile(path):
                raise RuntimeError(f"NeMo-Run wrote no sbatch script at {path}")
            print(f"sbatch script: {path}", flush=True)
    return 0


def report(exp) -> int:
    """0 when every job of the (finished) experiment succeeded, else 1, printing each job's final state and
    where its logs are: ``exp.run()`` returns normally whatever the jobs did."""
    from torchx.specs import AppState

    code = 0
    for job in exp.jobs:
        state, logs = job.state, job.executor.job_dir
        if state == AppState.SUCCEEDED:
            print(f"job {job.handle} succeeded; logs under {logs}", flush=True)
            continue
        hint = HINTS.get(state.name, "")
        print(f"error: job {job.handle} ended {state.name}; logs under {logs}{hint}", file=sys.stderr, flush=True)
        code = 1
    return code


def run_and_report(args: argparse.Namespace, task) -> int:
    """Run the task, wait for it (NeMo-Run waits on leaving the context) and report its final state."""
    with build_experiment(args) as exp:
        exp.add(task, name="train", tail_logs=True)
        exp.run()
    return report(exp)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        task, _ = prepare(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return dryrun(args, task) if args.dryrun else run_and_report(args, task)


if __name__ == "__main__":
    sys.exit(main())
