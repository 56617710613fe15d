"""The loss the trainer optimises equals the stock Hugging Face loss, padded or packed, forward and backward."""

from __future__ import annotations

import torch
from helpers import tiny_llama
from peft import LoraConfig, get_peft_model

from app.sft import loss as loss_module
from app.sft.loss import IGNORE_INDEX, causal_lm_loss_sum, count_label_tokens


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


def test_loss_sum_matches_transformers_mean_loss_times_token_count():
    model = tiny_llama()
    batch = _padded(_examples())
    loss_sum, n_tokens = causal_lm_loss_sum(model, batch)
    reference = model(**batch).loss
    assert int(n_tokens) == count_label_tokens(batch["labels"])
    torch.testing.assert_close(loss_sum / n_tokens, reference, rtol=1e-5, atol=1e-6)


def test_gradients_match_transformers_loss():
    model = tiny_llama(tie_word_embeddings=True)
    batch = _padded(_examples(seed=1))
    loss_sum, n_tokens = causal_lm_loss_sum(model, batch)
    (loss_sum / n_tokens).backward()
    ours = _grads(model)
    model.zero_grad()
    model(**batch).loss.backward()
    reference = _grads(model)
    assert ours.keys() == reference.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


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


def test_lora_model_loss_matches_its_own_forward(monkeypatch):
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    batch = _padded(_examples(seed=3))
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_TOKENS", 5)  # several chunks of positions
    loss_sum, n_tokens = causal_lm_loss_sum(model, batch)
    torch.testing.assert_close(loss_sum / n_tokens, model(**batch).loss, rtol=1e-5, atol=1e-6)


def test_only_labelled_positions_reach_the_output_layer():
    model = tiny_llama()
    batch = _padded(_examples(seed=4))
    seen = []
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    causal_lm_loss_sum(model, batch)
    handle.remove()
    assert seen == [torch.Size([1, count_label_tokens(batch["labels"]), model.config.vocab_size])]


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
