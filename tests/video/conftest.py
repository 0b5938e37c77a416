import pytest
import torch

from transfer.backbones import build_backbone


@pytest.fixture(scope="module", params=["rs50", "resnet50"])
def backbone2d(request):
    """A random-weight 2D backbone whose BN layers are not the identity (timm zero-inits the last BN of each block,
    which would make every residual branch vanish and the invariants hold trivially)."""
    torch.manual_seed(0)
    b = build_backbone(request.param, weights="random").eval()
    for m in b.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.normal_(m.bias, 0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return b
