"""Tiny HuggingFace transformers (config only, random init, dict batches) through
``forward=``: Hessian products against central differences, landscape slices against the
model moved by hand, and zero rows for embedding entries no batch uses."""

from __future__ import annotations

import copy

import pytest
import torch
from test_hessian_attention import central_differences, rel_err
from torch import nn

from flatlab import landscape
from flatlab.hessian import HessianOperator

transformers = pytest.importorskip("transformers")

CE = nn.CrossEntropyLoss()
VOCAB = 30


def logits(model: nn.Module, x: dict) -> torch.Tensor:
    return model(**x).logits


def bert_case():
    """2-layer BERT, hidden 16, float64; two batches of dicts with padding in some rows."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(config).double()
    # no id 0: BERT's word embedding has padding_idx=0, whose row torch treats as a constant
    # (its gradient is defined as zero), so differences that move it see a different function;
    # ids >= VOCAB - 10 never occur
    ids = torch.randint(1, VOCAB - 10, (7, 6))
    mask = torch.ones(7, 6, dtype=torch.long)
    mask[:3, 4:] = 0
    y = torch.randint(0, 3, (7,))
    batches = [({"input_ids": ids[:4], "attention_mask": mask[:4]}, y[:4], torch.arange(4)),
               ({"input_ids": ids[4:], "attention_mask": mask[4:]}, y[4:], torch.arange(3))]
    return model, batches


def gpt2_case():
    """2-layer GPT-2, hidden 16, float64, input ids as a plain tensor."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2,
                                     n_head=2, num_labels=3, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=1)
    model = transformers.GPT2ForSequenceClassification(config).double()
    ids = torch.randint(1, VOCAB, (6, 5))
    return model, [(ids, torch.randint(0, 3, (6,)))]


# measured (torch 2.13 CPU, float64, fourth-order differences, step 1e-5): BERT 1.1e-12,
# GPT-2 8.5e-12
@pytest.mark.parametrize(("case", "forward"), [
    (bert_case, logits),
    (gpt2_case, lambda m, ids: m(input_ids=ids).logits),
])
@pytest.mark.parametrize("backend", ["auto", "forward"])
def test_products_match_central_differences(case, forward, backend):
    model, batches = case()
    op = HessianOperator(model, CE, batches, forward=forward, backend=backend,
                         cache=backend == "auto")
    block = torch.randn(op.size, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reference = central_differences(model, batches, CE, block, forward=forward)
    assert rel_err(op.matvec(block), reference) < 1e-10
    assert rel_err(op.matvec(block[:, 1]), reference[:, 1]) < 1e-10
    assert model.training  # a fresh HF model is in train mode; products ran in eval mode


def test_unused_embedding_rows_are_zero_rows():
    model, batches = bert_case()
    op = HessianOperator(model, CE, batches, forward=logits)
    product = op.unflatten(op.matvec(torch.ones(op.size, dtype=torch.float64)))
    words = product["bert.embeddings.word_embeddings.weight"]
    assert torch.equal(words[VOCAB - 10:], torch.zeros_like(words[VOCAB - 10:]))
    assert words[:VOCAB - 10].abs().sum(1).gt(0).any()
    positions = product["bert.embeddings.position_embeddings.weight"]
    assert torch.equal(positions[6:], torch.zeros_like(positions[6:]))  # sequences of length 6


def test_landscape_slice_with_forward_equals_the_moved_model():
    model, batches = bert_case()
    direction = landscape.random_direction(model, generator=torch.Generator().manual_seed(2))
    result = landscape.slice_1d(model, CE, batches, direction, [0.0, 0.5], forward=logits)
    for alpha, loss, accuracy in zip([0.0, 0.5], result["loss"], result["accuracy"],
                                     strict=True):
        moved = copy.deepcopy(model).eval()
        with torch.no_grad():
            for name, p in moved.named_parameters():
                p.add_(alpha * direction[name])
            total = correct = 0.0
            for x, y, _ in batches:
                out = moved(**x).logits
                total += len(y) * float(CE(out, y))
                correct += float((out.argmax(-1) == y).sum())
        assert float(loss) == pytest.approx(total / 7, rel=1e-12)
        assert float(accuracy) == correct / 7


def test_the_padding_embedding_row_is_a_constant():
    model, batches = bert_case()
    x, y, _ = batches[0]
    padded = {**x, "input_ids": x["input_ids"].clone()}
    padded["input_ids"][:, -1] = model.config.pad_token_id  # 0: padding_idx of the embedding
    op = HessianOperator(model, CE, (padded, y), forward=logits)
    ones = torch.ones(op.size, dtype=torch.float64)
    words = op.unflatten(op.matvec(ones))["bert.embeddings.word_embeddings.weight"]
    assert torch.equal(words[0], torch.zeros_like(words[0])) and words[1:].abs().sum() > 0
