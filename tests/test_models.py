"""ccfs_dist.training.models: architectures, output shapes, checkpoint layouts and their errors."""
import pytest
import torch
import torch.nn as nn

from ccfs_dist.errors import ConfigError, DataError
from ccfs_dist.training.models import build_model, load_checkpoint, state_dict_of


def convnet(norm="batchnorm", width=8, depth=3):
    return {"name": "convnet", "width": width, "depth": depth, "norm": norm}


@pytest.mark.parametrize("norm", ["batchnorm", "instancenorm", "none"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 32])
def test_convnet_output_shape(norm, channels, size):
    model = build_model(convnet(norm), num_classes=7, channels=channels, image_size=size)
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    assert len(norms) == (0 if norm == "none" else 3)
    if norm == "instancenorm":
        assert all(isinstance(m, nn.GroupNorm) and m.num_groups == 8 and m.affine for m in norms)
    assert sum(isinstance(m, nn.AvgPool2d) for m in model.modules()) == 3
    assert model.classifier.in_features == 8 * (size // 8) ** 2


def test_convnet_depth_too_deep_for_image():
    with pytest.raises(ConfigError, match="model.depth=4.*image_size=8"):
        build_model(convnet(depth=4), 10, 1, 8)


def test_convnet_unknown_norm():
    with pytest.raises(ConfigError, match="model.norm"):
        build_model(convnet(norm="layernorm"), 10, 1, 8)


@pytest.mark.parametrize("channels", [1, 3])
def test_resnet18_cifar_stem(channels):
    model = build_model({"name": "resnet18"}, num_classes=10, channels=channels, image_size=32)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.padding == (1, 1)
    assert model.conv1.in_channels == channels
    assert isinstance(model.maxpool, nn.Identity)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, channels, 32, 32)).shape == (2, 10)


def test_torchvision_models():
    model = build_model({"name": "resnet18_imagenet"}, num_classes=5, channels=1, image_size=32)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.in_channels == 1
    assert not isinstance(model.maxpool, nn.Identity)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    mobile = build_model({"name": "mobilenet_v3_small"}, num_classes=4, channels=3, image_size=32).eval()
    with torch.no_grad():
        assert mobile(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(ConfigError, match="mobilenet_v3_small.*1 channel"):
        build_model({"name": "mobilenet_v3_small"}, num_classes=4, channels=1, image_size=32)


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="unknown model.name 'resnet19'.*convnet.*resnet18"):
        build_model({"name": "resnet19"}, 10, 3, 32)


def _saved_layouts(sd):
    return {
        "plain": sd,
        "model": {"model": sd, "epoch": 3},
        "state_dict": {"state_dict": sd},
        "module": {f"module.{k}": v for k, v in sd.items()},
        "orig_mod": {f"_orig_mod.{k}": v for k, v in sd.items()},
    }


@pytest.mark.parametrize("layout", ["plain", "model", "state_dict", "module", "orig_mod"])
def test_checkpoint_round_trip(tmp_path, layout):
    torch.manual_seed(0)
    src = build_model(convnet(), 10, 1, 8)
    with torch.no_grad():  # make running stats non-default so that buffers are checked too
        src.train()(torch.randn(16, 1, 8, 8))
    path = tmp_path / f"{layout}.pt"
    torch.save(_saved_layouts(state_dict_of(src))[layout], path)
    torch.manual_seed(1)
    dst = build_model(convnet(), 10, 1, 8)
    assert load_checkpoint(dst, path) is dst
    for key, value in src.state_dict().items():
        assert torch.equal(value, dst.state_dict()[key]), key
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(src.eval()(x), dst.eval()(x))


class Compiled(nn.Module):
    """Stands in for torch.compile's wrapper: the real module under `_orig_mod`."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module

    def forward(self, x):
        return self._orig_mod(x)


def data_parallel(model):
    # DataParallel wants the module on the first GPU when there is one
    return nn.DataParallel(model.cuda() if torch.cuda.is_available() else model)


@pytest.mark.parametrize("wrap", [data_parallel, Compiled, lambda m: Compiled(data_parallel(m))])
def test_state_dict_of_unwraps(wrap):
    model = build_model(convnet(), 10, 1, 8)
    wrapped = wrap(model)
    assert any(k.startswith(("module.", "_orig_mod.")) for k in wrapped.state_dict())
    sd = state_dict_of(wrapped)
    assert set(sd) == set(build_model(convnet(), 10, 1, 8).state_dict())


@pytest.mark.parametrize("wrap", [data_parallel, Compiled])
def test_load_into_wrapped_model(tmp_path, wrap):
    src = build_model(convnet(), 10, 1, 8)
    torch.save(state_dict_of(src), tmp_path / "m.pt")
    inner = build_model(convnet(), 10, 1, 8)
    dst = wrap(inner)
    assert load_checkpoint(dst, tmp_path / "m.pt") is dst
    assert torch.equal(inner.classifier.weight.cpu(), src.classifier.weight)


def test_checkpoint_mismatch(tmp_path):
    path = tmp_path / "narrow.pt"
    torch.save(build_model(convnet(width=4), 10, 1, 8).state_dict(), path)
    with pytest.raises(DataError, match=r"narrow\.pt.*ConvNet.*shape mismatch.*features\.0\.weight"):
        load_checkpoint(build_model(convnet(width=8), 10, 1, 8), path)
    path2 = tmp_path / "resnet.pt"
    torch.save(build_model({"name": "resnet18"}, 10, 1, 32).state_dict(), path2)
    with pytest.raises(DataError, match=r"resnet\.pt.*ConvNet.*missing key.*unexpected key"):
        load_checkpoint(build_model(convnet(), 10, 1, 32), path2)


def test_checkpoint_not_loadable(tmp_path):
    model = build_model(convnet(), 10, 1, 8)
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(DataError, match=r"garbage\.pt.*could not be loaded"):
        load_checkpoint(model, bad)
    with pytest.raises(DataError, match=r"absent\.pt.*does not exist"):
        load_checkpoint(model, tmp_path / "absent.pt")
    notsd = tmp_path / "list.pt"
    torch.save([1, 2, 3], notsd)
    with pytest.raises(DataError, match=r"list\.pt.*does not hold a state dict"):
        load_checkpoint(model, notsd)
