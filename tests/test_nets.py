import logging
from pathlib import Path

import pytest
import torch

from stylepipe.nets import (
    LossNetwork,
    PerceptualLoss,
    TransformerNet,
    WeightsUnavailable,
    gram_matrix,
    load_vgg16_features,
)
from stylepipe.nets.vgg import imagenet_cache_path


def test_transformer_keeps_image_size_and_has_johnson_layout():
    net = TransformerNet()
    out = net(torch.rand(2, 3, 32, 48))
    assert out.shape == (2, 3, 32, 48)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert (convs[0].in_channels, convs[0].out_channels, convs[0].kernel_size) == (3, 32, (9, 9))
    assert (convs[-1].in_channels, convs[-1].out_channels, convs[-1].kernel_size) == (32, 3, (9, 9))
    assert len(net.residual) == 5
    assert any(isinstance(m, torch.nn.ReflectionPad2d) for m in net.modules())
    assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in net.modules())


def test_random_weights_are_seeded_frozen_and_warn_loudly(caplog):
    caplog.set_level(logging.WARNING, logger="stylepipe.nets.vgg")
    a = load_vgg16_features("random", seed=3)
    b = load_vgg16_features("random", seed=3)
    c = load_vgg16_features("random", seed=4)
    assert torch.equal(a[0].weight, b[0].weight)
    assert not torch.equal(a[0].weight, c[0].weight)
    assert all(not p.requires_grad for p in a.parameters())
    assert not a.training
    assert "RANDOM WEIGHTS" in caplog.text


def test_local_weights_file_loads_with_weights_only(tmp_path: Path):
    from torchvision.models import vgg16

    full = vgg16(weights=None).state_dict()
    path = tmp_path / "vgg16.pth"
    torch.save(full, path)
    features = load_vgg16_features(str(path))
    assert torch.equal(features[0].weight, full["features.0.weight"])


def test_missing_or_wrong_weights_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(WeightsUnavailable, match="not found") as err:
        load_vgg16_features(str(tmp_path / "missing.pth"))
    assert "random" in str(err.value) and "imagenet" in str(err.value)
    wrong = tmp_path / "wrong.pth"
    torch.save({"weight": torch.zeros(1)}, wrong)
    with pytest.raises(WeightsUnavailable, match="not a VGG16 state_dict"):
        load_vgg16_features(str(wrong))


def test_imagenet_offline_and_uncached_names_cache_path_and_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("STYLEPIPE_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable) as err:
        load_vgg16_features("imagenet")
    message = str(err.value)
    assert str(imagenet_cache_path()) in message
    assert str(tmp_path / "torch") in message
    assert "local VGG16 state_dict file" in message and "vgg_weights=random" in message


def test_imagenet_weights_come_from_torchvisions_cache(tmp_path, monkeypatch):
    from torchvision.models import vgg16

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("STYLEPIPE_OFFLINE", "1")
    cached = imagenet_cache_path()
    cached.parent.mkdir(parents=True)
    state = vgg16(weights=None).state_dict()
    torch.save(state, cached)
    features = load_vgg16_features("imagenet")
    assert torch.equal(features[2].weight, state["features.2.weight"])


def _criterion(layers=("relu1_2", "relu2_2"), gram_fp32=True, scale=1.0):
    features = load_vgg16_features("random", seed=0)
    with torch.no_grad():
        for m in features:
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(scale)
    net = LossNetwork(features, list(layers))
    return PerceptualLoss(net, torch.rand(3, 32, 32), ["relu2_2"], list(layers), gram_fp32=gram_fp32)


def test_loss_normalises_without_touching_callers_tensors():
    criterion = _criterion()
    output, content = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    before = (output.clone(), content.clone())
    terms = criterion(output, content)
    assert torch.equal(output, before[0]) and torch.equal(content, before[1])
    assert terms.content > 0 and terms.style > 0 and terms.tv > 0
    same = criterion(content, content)
    assert same.content == 0


def test_gram_stays_fp32_under_autocast():
    features = torch.rand(1, 8, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gram_matrix(features.bfloat16()).dtype == torch.float32
        assert gram_matrix(features.bfloat16(), force_fp32=False).dtype == torch.bfloat16


def test_fp16_gram_overflows_where_fp32_gram_does_not():
    # 128 x 128 positions with activations around 2: the sum of squares exceeds 65,504.
    features = torch.full((1, 4, 128, 128), 2.0)
    with torch.autocast("cpu", dtype=torch.float16):
        unsafe = gram_matrix(features.half(), force_fp32=False)
        safe = gram_matrix(features.half())
    assert not torch.isfinite(unsafe).all()
    assert torch.isfinite(safe).all()
    # 16,384 positions x 2^2, divided by C H W = 65,536
    assert safe[0, 0, 0].item() == pytest.approx(1.0)


def test_loss_network_computes_only_up_to_the_deepest_requested_layer():
    features = load_vgg16_features("random", seed=0)
    net = LossNetwork(features, ["relu2_2", "relu4_3"])
    images = torch.rand(2, 3, 32, 32)
    ran: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, m in enumerate(net.features)]
    full = net(images)
    depth_all = max(ran)
    ran.clear()
    partial = net(images, ["relu2_2"])
    for hook in hooks:
        hook.remove()
    assert list(partial) == ["relu2_2"] and torch.equal(partial["relu2_2"], full["relu2_2"])
    assert max(ran) == 8 < depth_all == 22  # relu2_2 is module 8, relu4_3 module 22
    with pytest.raises(ValueError, match="relu3_3"):
        net(images, ["relu3_3"])
