"""Packed attention: which kernel runs where, the variable-length path's layout, host-computed label positions.

The CUDA kernel itself (`torch.nn.attention.varlen.varlen_attn`) runs only on a GPU; here a reference with its
signature (causal sdpa on each example) stands in for it so that everything around the call (head layout,
grouped key/value heads, the scale, the offsets the collator hands through the model) is checked on a CPU.
`test_gpu.py` runs the real kernel against the per-example path on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama

from app.sft import attention
from app.sft.attention import document_causal_sdpa, packed_kernel, register_document_attention
from app.sft.data import PackedCollator
from app.sft.loss import IGNORE_INDEX, causal_lm_loss_sum, label_positions

EXAMPLES = [
    {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
    {"input_ids": [9, 10], "labels": [9, 10]},
    {"input_ids": [11, 12, 13, 14, 15, 16], "labels": [-100, 12, 13, -100, 15, 16]},
]


def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, enable_gqa=False,
                     calls=None):
    """What causal `varlen_attn` computes ([T, heads, head_dim] in and out), one example at a time."""
    assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32 and max_q == max_k
    bounds = cu_seq_q.tolist()
    assert max_q == max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    if calls is not None:
        calls.append(bounds)
    outputs = [
        F.scaled_dot_product_attention(query[a:b].transpose(0, 1), key[a:b].transpose(0, 1),
                                       value[a:b].transpose(0, 1), is_causal=True, scale=scale,
                                       enable_gqa=enable_gqa).transpose(0, 1)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(outputs)


def test_packed_rows_use_one_varlen_call_only_on_cuda_in_half_precision() -> None:
    available = attention._VARLEN_ATTN is not None
    cuda = torch.device("cuda")
    assert packed_kernel(torch.device("cpu"), torch.bfloat16) == "per_example"  # the CPU keeps the exact path
    assert packed_kernel(cuda, torch.bfloat16) == ("varlen" if available else "per_example")
    assert packed_kernel(cuda, torch.float16) == ("varlen" if available else "per_example")
    assert packed_kernel(cuda, torch.float32) == "per_example"  # flash attention has no fp32 kernel
    assert packed_kernel(cuda, torch.bfloat16, dropout=0.1) == "per_example"


SIGNATURES = {  # the keywords `varlen_attn` has taken across torch releases
    "2.13": frozenset({"scale", "window_size", "enable_gqa"}),
    "2.11": frozenset({"scale", "window_size"}),
    "window_only": frozenset({"window_size"}),
    "2.9": frozenset({"is_causal"}),
}


def kernel_with(parameters: frozenset[str], calls: list[list[int]]):
    """A stand-in for `varlen_attn` that accepts exactly `parameters` as keywords, as that torch's would."""
    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, **options):
        unknown = set(options) - parameters
        if unknown:
            raise TypeError(f"varlen_attn() got an unexpected keyword argument {sorted(unknown)[0]!r}")
        causal = options.get("window_size") == (-1, 0) or options.get("is_causal") is True
        assert causal, "the trainer only asks for causal attention"
        assert options.get("enable_gqa") or q.shape[1] == k.shape[1], "grouped heads without enable_gqa"
        return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=options.get("scale"),
                                enable_gqa=bool(options.get("enable_gqa")), calls=calls)
    return kernel


@pytest.mark.parametrize("signature", list(SIGNATURES))
@pytest.mark.parametrize("scaling", [None, 0.3])
def test_varlen_path_equals_per_example_attention(monkeypatch, signature, scaling) -> None:
    """Grouped key/value heads (4 query heads, 2 key/value heads) and a custom scale, with every signature torch
    has shipped: each keyword is passed only where that torch takes it."""
    torch.manual_seed(0)
    lengths = [3, 5, 1, 4]
    total = sum(lengths)
    query, key, value = torch.randn(1, 4, total, 8), torch.randn(1, 2, total, 8), torch.randn(1, 2, total, 8)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    offsets = torch.tensor([0, 3, 8, 9, 13], dtype=torch.int32)
    expected, _ = document_causal_sdpa(None, query, key, value, None, scaling=scaling, position_ids=position_ids)

    calls: list[list[int]] = []
    monkeypatch.setattr(attention, "_VARLEN_ATTN", kernel_with(SIGNATURES[signature], calls))
    monkeypatch.setattr(attention, "_VARLEN_PARAMETERS", SIGNATURES[signature])
    monkeypatch.setattr(attention, "packed_kernel", lambda *args, **kwargs: "varlen")

    got, _ = document_causal_sdpa(None, query, key, value, None, scaling=scaling, position_ids=position_ids,
                                  cu_seq_lens_q=offsets, max_length_q=5)
    assert got.shape == expected.shape == (1, total, 4, 8)
    torch.testing.assert_close(got, expected)
    assert calls == [[0, 3, 8, 9, 13]]  # one call for the whole row

    calls.clear()  # without the collator's offsets they are found from the positions
    got, _ = document_causal_sdpa(None, query, key, value, None, scaling=scaling, position_ids=position_ids)
    torch.testing.assert_close(got, expected)
    assert calls == [[0, 3, 8, 9, 13]]


def test_the_installed_torchs_varlen_keywords_are_the_ones_we_handle() -> None:
    """A torch whose `varlen_attn` takes neither causal keyword is not used (the per-example path runs)."""
    if attention._VARLEN_ATTN is not None:
        assert attention._VARLEN_PARAMETERS & {"window_size", "is_causal"}
        assert attention._VARLEN_CAUSAL


def test_the_collators_offsets_reach_the_kernel_through_the_model(monkeypatch) -> None:
    """A packed batch straight from `PackedCollator` into a Llama: every layer's attention gets the collator's
    offsets (no bounds are looked up on the device), and the loss and gradients equal the per-example path's."""
    batch = PackedCollator()(EXAMPLES)
    batch["label_positions"] = label_positions(batch["labels"])

    def loss_and_grads(model):
        loss, n_tokens = causal_lm_loss_sum(model, batch)
        loss.backward()
        return loss.detach(), int(n_tokens), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    reference = tiny_llama(seed=3).train()
    reference.set_attn_implementation(register_document_attention())
    expected = loss_and_grads(reference)

    calls: list[list[int]] = []
    monkeypatch.setattr(attention, "_VARLEN_ATTN", kernel_with(SIGNATURES["2.11"], calls))
    monkeypatch.setattr(attention, "_VARLEN_PARAMETERS", SIGNATURES["2.11"])
    monkeypatch.setattr(attention, "packed_kernel", lambda *args, **kwargs: "varlen")
    monkeypatch.setattr(attention, "_example_bounds", lambda *_: pytest.fail("bounds looked up on the device"))
    model = tiny_llama(seed=3).train()
    model.set_attn_implementation(register_document_attention())
    loss, n_tokens, grads = loss_and_grads(model)

    assert calls == [[0, 4, 6, 12]] * model.config.num_hidden_layers
    assert n_tokens == expected[1] == 7
    torch.testing.assert_close(loss, expected[0])
    for got, want in zip(grads, expected[2], strict=True):
        torch.testing.assert_close(got, want)


def test_label_positions_are_the_positions_whose_next_label_is_trained() -> None:
    labels = torch.tensor([[1, -100, 3, 4], [-100, 6, -100, -100]])
    positions = label_positions(labels)
    assert positions.tolist() == [1, 2, 4]  # row 0 scores t=1 (-> 3) and t=2 (-> 4); row 1 scores t=0 (-> 6)
    assert labels.flatten()[positions + 1].tolist() == [3, 4, 6]
    assert label_positions(torch.full((2, 3), IGNORE_INDEX)).numel() == 0


def test_precomputed_label_positions_give_the_same_loss_and_token_count() -> None:
    batch = PackedCollator()(EXAMPLES)
    model = tiny_llama(seed=1)
    without = causal_lm_loss_sum(model, batch)
    with_positions = causal_lm_loss_sum(model, {**batch, "label_positions": label_positions(batch["labels"])})
    torch.testing.assert_close(with_positions[0], without[0])
    assert int(with_positions[1]) == int(without[1]) == 7


def test_the_trainers_batches_bring_their_label_positions_from_the_host(tmp_path) -> None:
    """The step reads how many tokens it trains, and which, from the data loader: nothing to ask the GPU."""
    from helpers import build_tiny_tokenizer

    from app.sft import SFTConfig, SFTTrainer

    config = SFTConfig(base_model="tiny", dataset_format="alpaca", output_dir=str(tmp_path / "out"), batch_size=2,
                       max_steps=1, validation_split=0.0, packing=True, mixed_precision=None,
                       disable_progress_bar=True, audit_max_duplicate_share=1.0)
    rows = [{"instruction": "count to three", "output": "one two three"}, {"instruction": "hi", "output": "hello"}]
    trainer = SFTTrainer(config, model=tiny_llama(), tokenizer=build_tiny_tokenizer(), train_dataset=rows)
    batch = next(iter(trainer._train_loader([[0, 1]])))
    assert batch["label_positions"].device.type == "cpu"
    assert batch["label_positions"].tolist() == label_positions(batch["labels"]).tolist()
    assert batch["cu_seq_lens_q"].tolist()[-1] == batch["input_ids"].shape[1]
