"""Random micro-batches shared by the objective tests (full fp64 logits, sharded per rank)."""
import torch

VPAD, VOCAB = 48, 45  # 3 padded columns, on the last rank at TP = 2 and 4


def make_batch(seed=0, B=2, S=8, vpad=VPAD, vocab=VOCAB, teacher_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, S, vpad, generator=g, dtype=torch.float64) * 2
    teacher = student * 0.5 + torch.randn(B, S, vpad, generator=g, dtype=torch.float64) * teacher_scale
    student[..., vocab:] = 30.0  # padding garbage: must be ignored
    teacher[..., vocab:] = float("nan")
    probs = torch.softmax(student[..., :vocab], -1).reshape(-1, vocab)
    target = torch.multinomial(probs, 1, generator=g).view(B, S)
    mask = torch.ones(B, S, dtype=torch.float64)
    mask[:, :2] = 0.0  # prompt positions
    target[:, 0] = -100  # ignored ids at masked positions must not matter
    prefix = torch.zeros(B, S, dtype=torch.bool)
    prefix[0, 2:5] = True  # a teacher-written prefix in the first sequence
    rollout = (torch.log_softmax(student[..., :vocab], -1).gather(-1, target.clamp_min(0)[..., None])[..., 0]
               + 0.3 * torch.randn(B, S, generator=g, dtype=torch.float64))
    return dict(student=student, teacher=teacher, target=target, mask=mask, prefix=prefix, rollout=rollout, vocab=vocab)
