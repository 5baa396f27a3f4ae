"""The chunked loss is today's full cross-entropy: same value, same LoRA gradients (float32),
on the tiny Qwen3 with Qwen's real 152k vocabulary, with rows that learn nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from mediagent.loading import load_model
from mediagent.loss import HiddenStatesHead, use_chunked_loss


def _lora(model):
    # init_lora_weights=False: lora_B starts non-zero, so lora_A's gradient is not trivially 0
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    return get_peft_model(model, config)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def base(tiny_base, repo_params):
    return load_model(tiny_base, repo_params.model, torch.float32)


def _batch(vocab: int):
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (4, 40))
    labels = ids.clone()
    labels[0, :25] = -100  # a prompt, then the answer
    labels[1, :] = -100  # a row with nothing to learn
    labels[2, 10:30] = -100  # learned tokens on both sides of a masked span
    mask = torch.ones_like(ids)
    mask[3, 32:] = 0  # padding at the end of the last row
    labels[3, 32:] = -100
    return ids, mask, labels


@pytest.mark.parametrize("chunk", [7, 1024])  # many chunks / one chunk
@pytest.mark.parametrize("num_items", [None, 90])  # mean over this batch / over accumulated micro-batches
def test_chunked_equals_full_loss_and_lora_grads(base, chunk, num_items):
    ids, mask, labels = _batch(base.config.vocab_size)
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}

    full = _lora(copy.deepcopy(base))
    loss_full = full(input_ids=ids, attention_mask=mask, labels=labels, **kwargs).loss
    loss_full.backward()

    chunked_base = use_chunked_loss(copy.deepcopy(base), chunk_tokens=chunk)
    assert isinstance(chunked_base.lm_head, HiddenStatesHead)
    assert chunked_base.lm_head.weight is chunked_base.model.embed_tokens.weight  # still tied
    chunked = _lora(chunked_base)
    out = chunked(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
    assert out.logits.shape[-1] == base.config.hidden_size  # no vocabulary-sized tensor came out
    out.loss.backward()

    torch.testing.assert_close(out.loss, loss_full, rtol=1e-5, atol=0)
    g_full, g_chunked = _grads(full), _grads(chunked)
    assert g_full.keys() == g_chunked.keys() and len(g_full) == 2 * 3 * base.config.num_hidden_layers
    assert any(g.abs().max() > 0 for g in g_full.values())
    for name, want in g_full.items():
        # rtol 1e-5 of each tensor's scale: elements near 0 differ by float32 summation order
        torch.testing.assert_close(
            g_chunked[name], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=lambda m: f"{name}: {m}"
        )


def test_nothing_to_learn_gives_zero_loss_with_a_graph(base):
    model = _lora(use_chunked_loss(copy.deepcopy(base)))
    ids = torch.randint(0, 1000, (2, 8))
    out = model(input_ids=ids, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()  # no error, zero gradients
    assert all(float(g.abs().max()) == 0.0 for g in _grads(model).values())


def test_chunked_loss_without_grad_matches(base):
    ids, mask, labels = _batch(base.config.vocab_size)
    with torch.no_grad():
        want = copy.deepcopy(base)(input_ids=ids, attention_mask=mask, labels=labels).loss
        got = use_chunked_loss(copy.deepcopy(base), chunk_tokens=16)(
            input_ids=ids, attention_mask=mask, labels=labels
        ).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
