"""The loss the trainer optimises equals the stock Hugging Face loss, padded or packed, forward and backward."""

from __future__ import annotations

import torch
from helpers import tiny_llama
from peft import LoraConfig, get_peft_model

from app.sft import loss as loss_module
from app.sft.loss import IGNORE_INDEX, causal_lm_loss_sum, linear_cross_entropy_sum


def count_label_tokens(labels: torch.Tensor) -> int:
    """The reference count: labels after the causal shift that are not ignored."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def _examples(seed: int = 0, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random examples of different lengths whose first few tokens (the 'prompt') carry no label."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in torch.randint(6, 20, (n,), generator=g).tolist():
        ids = torch.randint(4, 100, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 2] = IGNORE_INDEX
        out.append((ids, labels))
    return out


def _padded(examples):
    width = max(len(ids) for ids, _ in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for row, (i, lab) in enumerate(examples):
        ids[row, : len(i)], labels[row, : len(i)], mask[row, : len(i)] = i, lab, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _packed(examples):
    labels = [lab.clone() for _, lab in examples]
    for lab in labels:
        lab[0] = IGNORE_INDEX  # never predict an example's first token from the previous example
    return {
        "input_ids": torch.cat([ids for ids, _ in examples]).unsqueeze(0),
        "position_ids": torch.cat([torch.arange(len(ids)) for ids, _ in examples]).unsqueeze(0),
        "labels": torch.cat(labels).unsqueeze(0),
    }


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_loss_and_gradients_match_transformers(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Our mean loss and every gradient equal the model's own `.loss` and its gradients; returns our loss sum and
    gradients."""
    loss_sum, n_tokens = causal_lm_loss_sum(model, batch)
    (loss_sum / n_tokens).backward()
    ours = _grads(model)
    model.zero_grad()
    reference = model(**batch).loss
    reference.backward()
    torch.testing.assert_close(loss_sum / n_tokens, reference, rtol=1e-5, atol=1e-6)
    reference_grads = _grads(model)
    assert ours.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    return loss_sum.detach(), ours


def test_loss_sum_matches_transformers_mean_loss_times_token_count():
    model = tiny_llama()
    batch = _padded(_examples())
    loss_sum, n_tokens = causal_lm_loss_sum(model, batch)
    reference = model(**batch).loss
    assert int(n_tokens) == count_label_tokens(batch["labels"])
    torch.testing.assert_close(loss_sum / n_tokens, reference, rtol=1e-5, atol=1e-6)


def test_gradients_match_transformers_loss():
    _assert_loss_and_gradients_match_transformers(tiny_llama(tie_word_embeddings=True), _padded(_examples(seed=1)))


def test_packed_row_gives_the_same_loss_and_gradients_as_the_padded_batch():
    examples = _examples(seed=2)
    model = tiny_llama()
    padded_sum, padded_tokens = causal_lm_loss_sum(model, _padded(examples))
    padded_sum.backward()
    padded_grads = _grads(model)
    model.zero_grad()
    packed_sum, packed_tokens = causal_lm_loss_sum(model, _packed(examples))
    packed_sum.backward()
    assert int(packed_tokens) == int(padded_tokens)
    torch.testing.assert_close(packed_sum, padded_sum, rtol=1e-3, atol=1e-5)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, padded_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_lora_model_loss_and_gradients_match_its_own_forward_and_skip_the_frozen_head(monkeypatch):
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    )
    batch = _padded(_examples(seed=3))
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_TOKENS", 5)  # several chunks of positions
    computed = []
    chunks = loss_module._linear_cross_entropy_chunks

    def spy(*args):
        computed.append(args[-1])
        return chunks(*args)

    monkeypatch.setattr(loss_module, "_linear_cross_entropy_chunks", spy)
    _, ours = _assert_loss_and_gradients_match_transformers(model, batch)
    assert all("lora_" in name for name in ours)
    assert computed == [(True, False, False)]  # the frozen output layer's weight gradient is never computed


def test_only_labelled_positions_reach_the_fused_output_layer(monkeypatch):
    model = tiny_llama()
    batch = _padded(_examples(seed=4))
    rows = []

    def spy(hidden, weight, bias, targets):
        rows.append((hidden.shape[0], len(targets)))
        return linear_cross_entropy_sum(hidden, weight, bias, targets)

    monkeypatch.setattr(loss_module, "linear_cross_entropy_sum", spy)
    causal_lm_loss_sum(model, batch)
    assert rows == [(count_label_tokens(batch["labels"]),) * 2]


def test_fused_loss_in_chunks_matches_transformers_with_a_biased_head_and_under_no_grad(monkeypatch):
    model = tiny_llama(seed=2)
    model.lm_head = torch.nn.Linear(32, model.config.vocab_size, bias=True)
    batch = _padded(_examples(seed=7))
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_TOKENS", 5)  # several chunks of positions
    loss_sum, ours = _assert_loss_and_gradients_match_transformers(model, batch)
    assert "lm_head.bias" in ours
    with torch.no_grad():
        no_grad_sum, _ = causal_lm_loss_sum(model, batch)
    assert not no_grad_sum.requires_grad
    torch.testing.assert_close(no_grad_sum, loss_sum)


def test_fused_loss_under_bf16_autocast_tracks_the_float32_loss():
    model = tiny_llama(seed=3, tie_word_embeddings=True)
    batch = _padded(_examples(seed=8))
    reference = model(**batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_sum, n_tokens = causal_lm_loss_sum(model, batch)
    (loss_sum / n_tokens).backward()
    assert loss_sum.dtype == torch.float32
    torch.testing.assert_close(loss_sum / n_tokens, reference.detach(), rtol=1e-2, atol=0)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_model_that_soft_caps_its_logits_falls_back_without_disturbing_dropout():
    """Gemma-2 rescales the output layer's logits: the fused loss would be wrong there, so the output layer runs
    as usual, and the attempt leaves the random state (dropout) as if only one forward pass had run."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=151, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=5.0, attention_dropout=0.3,
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).train()
    batch = _padded(_examples(seed=9))
    seen = []
    model.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    for _ in range(2):  # the first call finds out, the second remembers
        torch.manual_seed(1)
        loss_sum, n_tokens = causal_lm_loss_sum(model, batch)
        torch.manual_seed(1)
        torch.testing.assert_close(loss_sum / n_tokens, model(**batch).loss, rtol=1e-5, atol=1e-6)
    labelled = torch.Size([1, count_label_tokens(batch["labels"]), 151])
    full = torch.Size([*batch["labels"].shape, 151])
    assert seen == [torch.Size([]), labelled, full, labelled, full]  # the fused layer is tried once only


def test_plain_module_returning_logits_is_supported():
    class Bigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(100, 100)

        def forward(self, input_ids, attention_mask=None):
            return self.table(input_ids)

    model = Bigram()
    batch = _padded(_examples(seed=5))
    loss_sum, n_tokens = causal_lm_loss_sum(model, batch)
    logits = model(batch["input_ids"])[:, :-1]
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 100),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    torch.testing.assert_close(loss_sum, expected)
    assert int(n_tokens) == count_label_tokens(batch["labels"])


def test_document_attention_on_a_packed_row_matches_the_padded_batch():
    from app.sft.attention import register_document_attention

    examples = _examples(seed=6, n=5)
    padded_model = tiny_llama(seed=1)
    packed_model = tiny_llama(seed=1)
    packed_model.set_attn_implementation(register_document_attention())
    padded_sum, _ = causal_lm_loss_sum(padded_model, _padded(examples))
    packed_sum, _ = causal_lm_loss_sum(packed_model, _packed(examples))
    padded_sum.backward()
    packed_sum.backward()
    torch.testing.assert_close(packed_sum, padded_sum, rtol=1e-4, atol=1e-5)
    padded_grads = _grads(padded_model)
    for name, grad in _grads(packed_model).items():
        torch.testing.assert_close(grad, padded_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    # Generation and padded batches fall back to stock sdpa: same logits as the untouched model.
    batch = _padded(examples)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    torch.testing.assert_close(packed_model(**inputs).logits, padded_model(**inputs).logits)
