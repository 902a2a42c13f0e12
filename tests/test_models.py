"""The model factory: NiN (ImageNet variant), torchvision ResNets and GoogLeNet, channels_last."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from lightning_asyncpred import ImageClassifier
from lightning_asyncpred.models import available_models, create_model

# Caffe model zoo NiN (ImageNet): conv1 11x11x3x96, cccp1/2 96x96, conv2 5x5x96x256, cccp3/4 256x256,
# conv3 3x3x256x384, cccp5/6 384x384, conv4 3x3x384x1024, cccp7 1024x1024, cccp8 1024x1000, with biases
NIN_CAFFE_PARAMS = (
    (11 * 11 * 3 * 96 + 96) + 2 * (96 * 96 + 96)
    + (5 * 5 * 96 * 256 + 256) + 2 * (256 * 256 + 256)
    + (3 * 3 * 256 * 384 + 384) + 2 * (384 * 384 + 384)
    + (3 * 3 * 384 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 1000 + 1000)
)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_names():
    names = set(available_models())
    assert {"digits_cnn", "nin", "googlenet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"} <= names
    with pytest.raises(ValueError, match="unknown model"):
        create_model("alexnet9000", 10)


def test_nin_imagenet_shape_and_caffe_parameter_count():
    model = create_model("nin", 1000).eval()
    assert NIN_CAFFE_PARAMS == 7_595_176
    assert n_params(model) == NIN_CAFFE_PARAMS  # ~7.6 M, as the Caffe model
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 1000)
        features = model.features(torch.randn(1, 3, 224, 224))
    assert features.shape == (1, 1000, 6, 6)  # 224 -> 54 -> 27 -> 13 -> 6 with Caffe's round-up pooling


def test_nin_small_inputs_and_classes():
    model = create_model("nin", 3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 55, 55)).shape == (1, 3)  # the smallest input NiN accepts
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_resnet50_is_torchvisions():
    model = create_model("resnet50", 1000)
    assert n_params(model) == 25_557_032
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert create_model("resnet18", 7).fc.out_features == 7
    zero = create_model("resnet50", 10, zero_init_residual=True)
    assert torch.count_nonzero(zero.layer1[0].bn3.weight) == 0


def test_googlenet_aux_heads_train_only():
    model = create_model("googlenet", 5)
    assert model.aux1 is not None and model.aux2 is not None
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == out.aux_logits1.shape == out.aux_logits2.shape == (2, 5)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_classifier_googlenet_loss_weights_aux_by_0_3():
    torch.manual_seed(0)
    module = ImageClassifier(arch="googlenet", num_classes=4)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 3])
    module.train()
    torch.manual_seed(1)
    out = module(x)
    loss, logits = module._loss(out, y)
    expected = F.cross_entropy(out.logits, y) + 0.3 * (F.cross_entropy(out.aux_logits1, y) + F.cross_entropy(out.aux_logits2, y))
    assert torch.allclose(loss, expected)
    assert logits is out.logits
    module.eval()
    with torch.no_grad():
        assert module(x).shape == (2, 4)  # eval: main head only


@pytest.mark.parametrize("arch", ["nin", "resnet18", "googlenet"])
def test_channels_last(arch):
    module = ImageClassifier(arch=arch, num_classes=3, channels_last=True).eval()
    conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert module(torch.randn(2, 3, 64, 64)).shape == (2, 3)
