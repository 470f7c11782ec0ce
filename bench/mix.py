"""The long-tailed length mix the benchmarks share: the shape of reasoning traces."""
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
