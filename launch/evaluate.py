"""avg@n of a recipe's student on a JSONL of problems with reference answers.

    torchrun --nproc-per-node 2 -m launch.evaluate --recipe tiny --problems runs/demo/held_out.jsonl \
        --samples 4 --results runs/demo/eval_avg4.jsonl [key=value ...]

The weights are the run's latest checkpoint (``checkpoint.dir``) when it has one, else the
recipe's ``student.checkpoint``; ``--weights DIR`` names another (a Megatron checkpoint or a
Hugging Face folder). Prompts get the recipe's
chat template (``data.*`` settings, e.g. ``data.prompt_field=problem``). Prints avg@n and pass@n;
the results file holds every sample with its extracted answer and verdict.
"""
import json
import os
import sys
from dataclasses import replace

import torch.distributed as dist

from launch import run_main
from recipes import parse_recipe_args, recipe_parser


def main(argv=None) -> None:
    parser = recipe_parser(__doc__)
    parser.add_argument("--problems", required=True, help="JSONL with a prompt and a reference answer per line")
    parser.add_argument("--samples", type=int, default=1, help="n of avg@n (1: greedy)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature when n > 1")
    parser.add_argument("--max-new-tokens", type=int,
                        help="default: the recipe's eval budget (eval.max_new_tokens, else the rollouts')")
    parser.add_argument("--max-problems", type=int, default=0, help="0: all")
    parser.add_argument("--weights", help="a checkpoint folder (a run's root or one step_* folder)")
    parser.add_argument("--results", help="results JSONL (default: none)")
    args, cfg = parse_recipe_args(parser, argv)

    from tropd_megatron.evaluation.avg_at_n import evaluate, load_problems
    from tropd_megatron.megatron import build_gpt, initialize
    from tropd_megatron.validate import validate
    from tropd_megatron.megatron.inference import Generator
    from tropd_megatron.platform import Platform
    from tropd_megatron.tokenizer import load_tokenizer, prompt_encoder
    from tropd_megatron.train import load_weights, run_model_configs, trained_student

    validate(cfg, int(os.environ.get("WORLD_SIZE", 1)), Platform.detect())
    initialize(cfg.parallel, seed=cfg.schedule.seed)
    tokenizer = load_tokenizer(cfg.tokenizer)
    student_model, _ = run_model_configs(cfg)
    weights = trained_student(cfg, args.weights)  # before the model: a run without weights stops here
    model = build_gpt(student_model, cfg.parallel, frozen=True)
    path = load_weights(weights, model, student_model, "student")
    problems = load_problems(replace(cfg.data, path=args.problems), prompt_encoder(tokenizer, cfg.data.chat_template),
                             args.max_problems)
    budget = args.max_new_tokens or cfg.eval_max_new_tokens()
    generator = Generator(model, student_model, eos_id=tokenizer.eos_id, engine=cfg.rollout.engine,
                          max_request_tokens=cfg.data.max_prompt_tokens + budget, name="student")
    result = evaluate(generator, problems, tokenizer.decode, samples=args.samples, temperature=args.temperature,
                      max_new_tokens=budget, seed=cfg.schedule.seed, results_path=args.results)
    if dist.get_rank() == 0:
        print(json.dumps({"weights": str(path), "problems_file": args.problems, **result.as_dict()}), flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
