"""Make a tiny random model take the path a test is about."""
import torch


def bias_token(gpt, token: int, bias: float):
    """Add ``bias`` to ``token``'s logit wherever ``gpt`` (a GPTModel's last stage) computes
    logits, in training and in generation alike (an output-layer bias on one row): a random
    model that would almost never emit its end token then stops after a few tokens. Returns the
    hook handle."""
    from megatron.core import parallel_state

    if not hasattr(gpt, "output_layer"):  # not the last pipeline stage: no logits here
        return None
    weight = gpt.output_layer.weight if gpt.output_layer.weight is not None else gpt.shared_embedding_or_output_weight()
    local = weight.shape[0]
    full = local * parallel_state.get_tensor_model_parallel_world_size()
    start = parallel_state.get_tensor_model_parallel_rank() * local

    def hook(module, inputs, output):
        logits, extra = output
        if logits.shape[-1] == full:  # generation gathers the vocabulary
            logits = logits + bias * (torch.arange(full) == token).to(logits.dtype)
        elif start <= token < start + local:  # a training forward's local shard
            logits = logits + bias * (torch.arange(local) == token - start).to(logits.dtype)
        return logits, extra

    return gpt.output_layer.register_forward_hook(hook)
