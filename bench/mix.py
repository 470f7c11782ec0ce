"""What the model benchmarks share: the long-tailed length mix (the shape of reasoning
traces), the model-size options and where the table goes."""
import math


def long_tailed_lengths(n: int, median: int, tail: float, sigma: float, rng) -> list[int]:
    """n log-normal lengths with this median, clipped to [1, tail x median]; one of them is
    set to tail x median, so the tail is always there. ``rng``: a random.Random."""
    out = [min(max(1, round(median * math.exp(sigma * rng.gauss(0, 1)))), round(tail * median)) for _ in range(n)]
    out[rng.randrange(n)] = round(tail * median)
    return out


def add_mix_arguments(parser, *, median: int) -> None:
    parser.add_argument("--median", type=int, default=median, help="median response length (tokens)")
    parser.add_argument("--tail", type=float, default=8.0, help="the longest response, as a multiple of the median")
    parser.add_argument("--sigma", type=float, default=0.8, help="log-normal spread of the lengths")


def add_model_arguments(parser, *, vocab: int) -> None:
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=vocab)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", help="also write the table to this file (rank 0)")


def publish(lines: list[str], markdown: str | None) -> None:
    """Print the table, and write it to ``markdown`` when given."""
    text = "\n".join(lines)
    print(text, flush=True)
    if markdown:
        with open(markdown, "w") as f:
            f.write(text + "\n")
