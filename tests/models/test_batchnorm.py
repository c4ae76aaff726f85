import torch

from metaensemble.models import create_model
from metaensemble.models.batchnorm import recompute_bn


def test_bn_recompute_is_the_exact_statistics_of_the_loader():
    """The one BN procedure (fused networks, the meta-train table): the mean over every
    image of the loader and the mean of its batches' unbiased variances, whatever the
    running statistics were."""
    torch.manual_seed(0)
    net = create_model("convnet", num_classes=10, in_chans=1, img_size=8, width=4)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    loader = [{"x": torch.randn(16, 1, 8, 8)} for _ in range(3)]
    recompute_bn(net, loader)
    bn0 = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    with torch.no_grad():
        hs = [net[0](b["x"]).transpose(0, 1).flatten(1) for b in loader]  # the first conv's outputs
    assert torch.allclose(bn0.running_mean, torch.cat(hs, 1).mean(dim=1), atol=1e-5)
    assert torch.allclose(bn0.running_var, torch.stack([h.var(dim=1) for h in hs]).mean(0), rtol=1e-4)
    assert not net.training
