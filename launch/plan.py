"""Print a recipe's per-GPU memory plan; exit 1 when it does not fit its GPU.

    python -m launch.plan --recipe llama3_70b_to_8b --gpus 64 student.model.recompute=selective
    python -m launch.plan --recipe qwen3_8b_to_1p7b --gpus 8 gpu=H200-141GB

``--gpus`` is the world size (default: the fewest both the student's and the teacher's layouts
fit); the recipe's ``gpu`` names the device (override it like any key). On a GPU it also lists
the student tensor-parallel sizes that fit beside the teacher's layout (``teacher.parallel``).
Exit codes: 0 fits, 1 does not fit, 2 bad recipe, override or layout. The numbers are estimates (see ``tropd_megatron.planner``).
"""
import sys

from recipes import parse_recipe_args, recipe_parser
from tropd_megatron.planner import GIB, MemoryPlan, plan, student_tensor_choices
from tropd_megatron import ConfigError


def check_fits(config, gpus: int) -> None:
    """Raise ValueError with the plan's table when ``config`` does not fit ``gpus`` x its GPU
    (also for a layout that cannot run); return silently when it fits."""
    memory = plan(config, gpus)
    if not memory.fits:
        raise ConfigError(f"the per-GPU memory plan does not fit:\n{memory.format()}")


def main(argv=None) -> int:
    parser = recipe_parser(__doc__)
    parser.add_argument("--gpus", type=int, help="world size (default tensor x pipeline)")
    args, config = parse_recipe_args(parser, argv)
    try:
        memory = plan(config, args.gpus)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(memory.format())
    if memory.capacity is not None:  # the throughput choice: the smallest student TP that fits
        fitting = [tp for tp, p in student_tensor_choices(config, memory.gpus).items()
                   if isinstance(p, MemoryPlan) and p.fits]
        print(f"student tensor-parallel sizes that fit beside the teacher at tensor {memory.teacher_tensor} x "
              f"pipeline {memory.teacher_pipeline}: {', '.join(map(str, fitting)) or 'none'}"
              + (f" (smallest, for generation throughput: parallel.tensor={fitting[0]})" if fitting else ""))
    if not memory.fits:
        print(f"error: {memory.name} does not fit {memory.gpu}: {memory.total / GIB:.2f} GiB per GPU planned, "
              f"{memory.capacity / GIB:.2f} GiB available", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
