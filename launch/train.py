"""Run a recipe: the torchrun entry point (also what sbatch and NeMo-Run launch).

    torchrun --nproc-per-node 2 -m launch.train --recipe tiny schedule.steps=2 objective.name=opd
    python -m launch.train --recipe llama3_70b_to_8b --print-config

Overrides are dotted ``key=value`` pairs on the recipe's RunConfig. Exit codes: 0 finished,
75 preempted with a checkpoint written (run again to resume), anything else failed.
"""
import os
import sys

from launch import run_main
from recipes import parse_recipe_args, recipe_parser


def parse(argv=None):
    parser = recipe_parser(__doc__)
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    return parse_recipe_args(parser, argv)


def main(argv=None) -> None:
    args, config = parse(argv)
    if args.print_config:
        from tropd_megatron.run_config import to_yaml

        s, t = config.parallel, config.teacher_parallel
        print(to_yaml(config) + f"# layouts: student tensor {s.tensor} x pipeline {s.pipeline}, teacher tensor "
              f"{t.tensor} x pipeline {t.pipeline} (teacher.parallel; null: the student's); data parallel: the "
              f"world size over each, a multiple of {config.min_world_size}")
        return
    from tropd_megatron.validate import validate

    world = int(os.environ.get("WORLD_SIZE", 1))
    from tropd_megatron.platform import Platform

    validate(config, world, Platform.detect())  # before anything is loaded or built
    if config.gpu != "cpu":  # refuse a layout that cannot fit before loading 100 GB of weights
        from launch.plan import check_fits

        check_fits(config, world)
    from tropd_megatron.train import train

    train(config)


if __name__ == "__main__":
    sys.exit(run_main(main))
