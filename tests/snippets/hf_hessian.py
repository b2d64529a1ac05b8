import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from flatlab.hessian import HessianOperator, top_eigenvalues

# A tiny randomly initialised BERT; BertForSequenceClassification.from_pretrained(...) or any
# other HuggingFace model works the same way.
torch.manual_seed(0)
config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=32, num_labels=2)
model = BertForSequenceClassification(config)

# Batches (inputs, labels) whose inputs are dicts of tensors, as a tokenizer returns them.
batches = []
for _ in range(2):
    inputs = {"input_ids": torch.randint(0, 100, (8, 10)),
              "attention_mask": torch.ones(8, 10, dtype=torch.long)}
    batches.append((inputs, torch.randint(0, 2, (8,))))

op = HessianOperator(model, nn.CrossEntropyLoss(), batches,
                     forward=lambda m, x: m(**x).logits)  # instead of model(x)
eigen = top_eigenvalues(op, k=2)
print(f"{op.size} parameters, top eigenvalues {eigen.eigenvalues.tolist()} "
      f"({eigen.matvecs} products)")
