import scipy.sparse.linalg
import torch
from torch import nn

from flatlab.hessian import HessianOperator

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
x, y = torch.randn(256, 10), torch.randint(0, 3, (256,))
batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]

op = HessianOperator(model, nn.CrossEntropyLoss(), batches)
linear_operator = op.to_scipy()  # float64 NumPy in and out; blocks go to op.matvec in one pass
eigenvalues, eigenvectors = scipy.sparse.linalg.eigsh(linear_operator, k=3, which="LA")
print("top 3 eigenvalues:", eigenvalues[::-1])
