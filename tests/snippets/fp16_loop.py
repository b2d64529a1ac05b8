import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatlab.optim import NSO  # SAM, ASAM and RWP take scaler= the same way

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
x, y = torch.randn(512, 20), torch.randint(0, 3, (512,))
x[:, 0] += 2.0 * y  # something to learn
loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3)).to(device)
loss_fn = nn.CrossEntropyLoss()

optimizer = NSO(model.parameters(), sigma=0.01, lr=0.05, momentum=0.9, model=model)
scaler = torch.amp.GradScaler(device)


def train_step(inputs, targets):
    def closure():  # called twice per step by NSO (at W + U and W - U)
        optimizer.zero_grad()
        with torch.autocast(device, dtype=torch.float16):
            loss = loss_fn(model(inputs), targets)
        scaler.scale(loss).backward()  # scaled, as in any AMP loop
        return loss

    loss = optimizer.step(closure, scaler=scaler)  # unscales once; skips the step on inf/NaN
    scaler.update()  # after every step, as with scaler.step(optimizer)
    return loss


for epoch in range(3):
    for inputs, targets in loader:
        loss = train_step(inputs.to(device), targets.to(device))
    print(f"epoch {epoch}: loss {loss.item():.3f}, scale {scaler.get_scale():.0f}")
