"""The causal-LM training loss without `batch x length x vocab` logits.

At Gemma 3's 262k-token vocabulary the logits of one 4 x 512 batch are 2 GB in float32, and autograd keeps them
and their softmax for the backward pass. Here the loss is computed from the backbone's hidden states, only at
positions that have a label, a chunk of positions at a time: each chunk's logits give its loss and, at once, the
gradients for the hidden states and the output matrix (softmax minus one-hot, the cross-entropy gradient), so
nothing of vocabulary size outlives its chunk and nothing is recomputed. The result equals the model's own loss
(`ForCausalLMLoss`: mean over labelled positions, or sum / `num_items_in_batch` under gradient accumulation).

Under bf16 autocast (`train.mixed_precision: bf16`) the three vocabulary-wide matmuls run in bf16 and the softmax
in float32; the float32 gradients are returned for float32 weights. There every pass over a vocabulary x width
tensor counts (a cast of Gemma 3's 262k x 640 matrix costs about a third of a chunk's matmul at one thread), so the
weight is cast once per optimizer step by the Trainer and its gradient converted once per group of chunks.

Used only where it matters, a vocabulary of `MIN_VOCAB` tokens or more (the organism's 1.5k keeps its float path
bit for bit), and only for heads that are a plain linear map of the last hidden state (`PLAIN_HEADS`, no logit
soft-capping or scaling); any other model keeps the model's own loss.
"""

from __future__ import annotations

import torch

PLAIN_HEADS = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "phi3", "gpt_neox", "olmo",
               "olmo2", "stablelm", "starcoder2", "smollm3"}
CHUNK_BYTES = 256 << 20  # float32 logits per chunk: a 256-token step at 262k in one (measured: 20% faster than 64 MB)
MIN_VOCAB = 32768
WGRAD_BYTES = 512 << 20  # softmax gradients (autocast dtype) per output-projection gradient matmul


def supports_chunked_loss(model) -> bool:
    config = model.config
    head = model.get_output_embeddings()
    return (isinstance(head, torch.nn.Linear) and head.bias is None and head.weight.shape[0] >= MIN_VOCAB
            and config.model_type in PLAIN_HEADS and not getattr(config, "final_logit_softcapping", None)
            and hasattr(model, "get_decoder"))


def tied_embedding(model) -> torch.nn.Embedding | None:
    """The input embedding when it is the output projection's weight (Gemma, GPT-2), else None.

    Why: training it with a dense lookup gradient writes a vocabulary x width zero tensor and adds it to the
    projection's gradient every step (two 671 MB passes at 262k x 640); with `sparse=True` the lookup's gradient is
    the batch's rows and autograd adds them into the projection's dense gradient before the optimizer sees it
    (measured on Gemma 3 270M, 2 x 128 tokens a step: 4.4-4.6 s -> 4.0-4.1 s)."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if isinstance(emb, torch.nn.Embedding) and head is not None and emb.weight is head.weight:
        return emb
    return None


def causal_lm_loss(model, input_ids, labels, attention_mask=None, num_items_in_batch=None,
                   low_weight=None, position_ids=None) -> torch.Tensor:
    """The model's causal-LM loss on (input_ids, labels), from its hidden states in vocabulary chunks
    (`low_weight`: the output projection already cast to the autocast dtype, see LinearCrossEntropy; `position_ids`
    restarting at 0 mark flattened texts, each attending only to itself)."""
    backbone = model.get_decoder()
    kwargs = {"attention_mask": attention_mask} if attention_mask is not None else {}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    hidden = backbone(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    weight = model.get_output_embeddings().weight
    total = LinearCrossEntropy.apply(hidden[:, :-1][keep], weight, targets[keep], max(1, CHUNK_BYTES // (4 * weight.shape[0])),
                                     low_weight)
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    return total / (count.to(total.device) if torch.is_tensor(count) else count)


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), its gradients computed chunk by chunk during the forward pass.

    Under autocast `low_weight` may carry the weight already cast to the autocast dtype (the Trainer casts it once
    per optimizer step, not once per micro-batch). The output projection's gradient is one matmul per group of
    chunks (`WGRAD_BYTES` of softmax gradients in the autocast dtype), converted to float32 once: per chunk, each
    bf16 product was converted and added into the float32 gradient, a 671 MB pass per chunk at 262k x 640."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, low_weight=None):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w and not n else None  # else the chunks write it
        device = hidden.device.type
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        low = low or (weight.dtype if weight.dtype != torch.float32 else None)  # a bf16 model: the same path
        w = low_weight if low and low_weight is not None else weight.to(low) if low else weight
        group = max(chunk, WGRAD_BYTES // (2 * weight.shape[0])) // chunk * chunk if low else chunk
        for start in range(0, n, chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            h = h.to(low) if low else h
            logits = (h @ w.T).float()
            picked = logits.gather(1, t[:, None])[:, 0]
            top = logits.max(-1, keepdim=True).values
            probs = logits.sub_(top).exp_()  # in place of the logits; max, exp, sum: half the time of logsumexp
            sums = probs.sum(-1)
            total += (top[:, 0] + sums.log() - picked).sum()
            if not (want_h or want_w):
                continue
            grad = probs.div_(sums[:, None])  # the softmax
            grad[torch.arange(len(t), device=t.device), t] -= 1.0
            if low and want_w:
                at = start % group
                if at == 0:  # a new group: its softmax gradients are written into one buffer
                    grads = torch.empty((min(group, n - start), weight.shape[0]), dtype=low, device=hidden.device)
                    group_h = hidden[start : start + len(grads)].to(low)
                grads[at : at + len(t)] = grad
                grad = grads[at : at + len(t)]
            elif low:  # a frozen head (LoRA): no weight gradient, so no group to collect
                grad = grad.to(low)
            if want_h:
                grad_h[start : start + chunk] = (grad @ w).to(hidden.dtype)
            if want_w and not low:
                grad_w = torch.mm(grad.T, h) if grad_w is None else grad_w.addmm_(grad.T, h)
            elif want_w and at + len(t) == len(grads):  # the group is complete: one matmul, one conversion
                part = grads.T @ group_h
                grad_w = part.float() if grad_w is None else grad_w.add_(part)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors  # scaled in place: no second vocabulary-sized tensor (backward runs once)
        return (grad_h.mul_(grad_output) if grad_h is not None else None,
                grad_w.mul_(grad_output).to(ctx.weight_dtype) if grad_w is not None else None, None, None, None)
