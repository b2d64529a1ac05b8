import torch
from safetensors.torch import save_file

from flatlab._compat import ensure_torchvision_importable

ensure_torchvision_importable()  # needed only for a CPU torch beside a CUDA torchvision wheel
import timm  # noqa: E402  (after the line above)

# Stands in for downloaded weights: a resnet18 with an ImageNet-sized head (1000 classes),
# saved as a plain state dict (no flatlab metadata). With real weights, use
# timm.create_model("resnet18", pretrained=True) instead.
torch.manual_seed(0)
model = timm.create_model("resnet18", num_classes=1000)
save_file(model.state_dict(), "pretrained.safetensors")
