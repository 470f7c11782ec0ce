"""The tiny student / teacher pair and random micro-batches the training-step tests share.
A sharp teacher (large init scale) against a near-uniform student, so that trust and outliers
mix; a vocabulary of 60 padded to 64 rows. Import after ``pytest.importorskip("megatron.core")``."""
import torch

from tropd_megatron.losses import TrOPDConfig
from tropd_megatron.megatron import MicroBatch, ModelConfig

VOCAB = 60
STUDENT = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                      vocab_size=VOCAB, padded_vocab_size=64, max_sequence_length=16)
TEACHER = ModelConfig(num_layers=2, hidden_size=48, num_attention_heads=4, ffn_hidden_size=96, vocab_size=VOCAB,
                      padded_vocab_size=64, max_sequence_length=16, init_method_std=0.3)
OBJECTIVE = TrOPDConfig(topk=8, seed=3)  # stochastic trust, forward-KL outliers, prefix guidance


def random_microbatches(seed: int, count: int) -> list[MicroBatch]:
    """``count`` micro-batches of 2 x 8 random tokens, the first two positions a prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, VOCAB, (2, 8), generator=g)
        mask = torch.ones(2, 8)
        mask[:, :2] = 0
        out.append(MicroBatch(tokens=tokens, labels=torch.roll(tokens, -1, 1), loss_mask=mask))
    return out
