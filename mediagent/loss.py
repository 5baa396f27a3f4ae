"""The training loss without the whole logits tensor (``train.loss: chunked``).

With Qwen's 151,936-entry vocabulary, float32 logits for a batch of 8 x 512 tokens take
2.3 GiB, and backward holds about three such tensors at once; with assistant-only labels
most of those rows are prompt tokens whose loss is masked anyway. The chunked loss:

1. keeps only the positions whose (shifted) label is learned, before the LM head;
2. applies the head and cross-entropy to ``CHUNK_TOKENS`` of them at a time, each chunk
   under activation checkpointing, so backward recomputes one chunk's logits instead of
   keeping every chunk's.

It is the same loss (sum over learned tokens / their count, or / ``num_items_in_batch``
under gradient accumulation, as transformers' ``ForCausalLMLoss``) and gives the same
gradients; pure PyTorch, so it runs on CPU and GPU alike.

How it plugs in: the model's ``lm_head`` is replaced by :class:`HiddenStatesHead`, which
holds the very same weight but returns the hidden states, and the model's
``loss_function`` by :func:`chunked_causal_lm_loss` bound to that weight. The model's own
``forward`` (and so DDP/FSDP wrappers around it) runs unchanged; only training uses it,
and its ``logits`` output is then the hidden states (training keeps only the loss).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

# Learned tokens per chunk: float32 logits of 1024 x 151,936 are 0.58 GiB, a small share of
# any GPU this project targets, and large enough that chunking costs no throughput.
CHUNK_TOKENS = 1024
IGNORE_INDEX = -100


class HiddenStatesHead(nn.Module):
    """Stands in for ``lm_head`` during training: the same weight, the hidden states out."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.weight = head.weight  # the same Parameter: tied embeddings stay tied
        self.bias = head.bias
        self.in_features, self.out_features = head.in_features, head.out_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def _chunk_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()  # upcast as ForCausalLMLoss does
    return F.cross_entropy(logits, labels, reduction="sum")


def chunked_causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int | None = None,
    *,
    head: nn.Module,
    num_items_in_batch=None,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int = CHUNK_TOKENS,
    **_,
) -> torch.Tensor:
    """Causal-LM cross-entropy from hidden states (passed as ``logits`` by the model's forward).

    Args:
        logits: hidden states (batch, seq, hidden) from :class:`HiddenStatesHead`.
        labels: (batch, seq) token ids, ``ignore_index`` where nothing is learned.
        vocab_size: unused (models pass it, by keyword or position, as to ForCausalLMLoss).
        head: the :class:`HiddenStatesHead`; its weight is read at each call, so a wrapper that
            swaps parameters in and out (FSDP, DeepSpeed ZeRO-3) hands over the live one.
        num_items_in_batch: learned tokens over all accumulated micro-batches (the Trainer
            passes it so that the loss is a per-token mean over the effective batch).
    """
    hidden, weight, bias = logits, head.weight, head.bias
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1).to(hidden.device)
    keep = shifted != ignore_index
    hidden = hidden.reshape(-1, hidden.shape[-1])[keep]
    targets = shifted[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    # A batch with nothing to learn still returns a loss connected to the graph.
    if targets.numel() == 0:
        total = total + 0.0 * hidden.sum()
    for start in range(0, targets.numel(), chunk_tokens):
        h, y = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, h, weight, bias, y, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, weight, bias, y)
    if num_items_in_batch is None:
        return total / max(targets.numel(), 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def use_chunked_loss(model: nn.Module, chunk_tokens: int = CHUNK_TOKENS) -> nn.Module:
    """Make a transformers causal LM compute its training loss chunked (in place).

    Call before wrapping it in peft (LoRA never targets the head here).
    """
    head = model.get_output_embeddings()
    if getattr(model.config, "final_logit_softcapping", None):
        # the model's forward would soft-cap the hidden states this head hands over
        raise ValueError(
            "train.loss: chunked cannot train a model that soft-caps its logits "
            "(config final_logit_softcapping); set train.loss: full"
        )
    if not isinstance(head, nn.Linear):
        raise TypeError(f"chunked loss needs a linear LM head, found {type(head).__name__}")
    stand_in = HiddenStatesHead(head)
    model.set_output_embeddings(stand_in)
    model.loss_function = functools.partial(chunked_causal_lm_loss, head=stand_in, chunk_tokens=chunk_tokens)
    return model
