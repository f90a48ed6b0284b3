"""The paper's inputs load as the authors publish them: teacher checkpoints written by torchvision's reference
training script (SRe2L's squeeze) in the official architecture, and CDA distilled folders."""
import argparse
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

from ccfs_dist.data.distilled import load_distilled
from ccfs_dist.training.models import build_model, load_checkpoint


def official_resnet18(num_classes):
    """The official code's create_model, written out here independently of ccfs_dist.training.models."""
    model = torchvision.models.get_model("resnet18", weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
    model.maxpool = nn.Identity()
    return model


@pytest.mark.parametrize("prefix", ["", "module."])
def test_squeeze_checkpoint_in_the_official_architecture_loads_and_predicts_the_same(tmp_path, prefix):
    torch.manual_seed(0)
    official = official_resnet18(10).eval()
    for m in official.modules():                   # non-trivial BatchNorm statistics, so a mix-up shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    # what torchvision's references/classification/train.py (SRe2L squeeze) saves: args is a Namespace
    checkpoint = {"model": {prefix + k: v for k, v in official.state_dict().items()},
                  "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "momentum": 0.9, "params": [0, 1]}]},
                  "lr_scheduler": {"T_max": 200, "last_epoch": 200}, "epoch": 199,
                  "args": argparse.Namespace(model="resnet18", lr=0.1, epochs=200, data_path="/data/cifar10")}
    path = tmp_path / "resnet18_cifar10_200epochs.pth"
    torch.save(checkpoint, path)
    ours = build_model({"name": "resnet18", "width": 32, "depth": 3, "norm": "batchnorm"}, 10, 3, 32).eval()
    load_checkpoint(ours, path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), official(x))


def test_a_checkpoint_holding_other_objects_is_still_refused(tmp_path):
    from ccfs_dist.errors import DataError
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "hook": os.system}, path)
    with pytest.raises(DataError, match="could not be loaded"):
        load_checkpoint(build_model({"name": "convnet", "width": 8, "depth": 1, "norm": "none"}, 2, 3, 8), path)


def test_cda_distilled_folder_layout_loads_in_class_then_name_order(tmp_path):
    """CDA / SRe2L recover writes new{class:03d}/class{class:03d}_id{i:03d}.jpg (the authors' distilled data)."""
    folder = tmp_path / "cda_cifar10_ipc2000"
    rng = np.random.default_rng(0)
    for c in range(3):
        os.makedirs(folder / f"new{c:03d}")
        for i in range(4):
            pixels = np.full((32, 32, 3), 40 * c + 10 * i, dtype=np.uint8) + rng.integers(0, 3, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"new{c:03d}" / f"class{c:03d}_id{i:03d}.jpg", quality=95)
    split = load_distilled(folder, ["airplane", "automobile", "bird"], 2, 3, 32)
    assert split.labels.tolist() == [0, 0, 1, 1, 2, 2]
    means = split.images.float().mean(dim=(1, 2, 3)).round().tolist()
    assert means == pytest.approx([1, 11, 41, 51, 81, 91], abs=2)   # ids 000 and 001 of each class


def test_every_missing_input_is_named_in_one_error_with_where_to_get_it(tmp_path):
    from ccfs_dist.config import load_config
    from ccfs_dist.errors import DataError
    from ccfs_dist.data.inputs import check_present
    (tmp_path / "teacher.pt").write_bytes(b"")                     # present: not named
    cfg = load_config(None, ["data.source=cifar10", f"data.root={tmp_path}/cifar", f"data.distilled={tmp_path}/syn",
                             f"teacher.checkpoint={tmp_path}/teacher.pt", "ccfs.difficulty=file",
                             f"ccfs.difficulty_file={tmp_path}/forgetting_CIFAR10.npy"])
    with pytest.raises(DataError) as err:
        check_present(cfg)
    message = str(err.value)
    assert message.startswith("3 inputs missing: data.root not found: ")
    for key, hint in [("data.root", "data.download=true"), ("data.distilled", "CDA"),
                      ("ccfs.difficulty_file", "ccfs scores")]:
        assert key in message and hint in message
    assert "teacher.checkpoint" not in message
    check_present(load_config(None, []))                           # the demo reads no file


def test_a_run_says_what_it_makes_itself():
    from ccfs_dist.config import load_config
    from ccfs_dist.data.inputs import made_here
    cfg = load_config(None, ["data.source=cifar10", "data.root=data", "teacher.epochs=200"])
    lines = made_here(cfg, 50000, 100)
    assert lines[0].startswith("teacher.checkpoint not given: training a teacher here, 200 epochs over 50,000 "
                               "images (10,000,000 image passes); the paper's runs use the authors' files")
    assert lines[1].startswith("data.distilled not given: the base distiller")
    assert made_here(cfg, 50000, 0)[1:] == []                       # alpha 0: no distilled images to make


def test_the_authors_files_are_named_only_where_they_exist():
    """The CCFS authors published teachers and distilled sets for CIFAR and Tiny-ImageNet only: an image folder
    (ImageNet-1K) run is not told that 'the paper's runs use the authors' files'."""
    from ccfs_dist.config import load_config
    from ccfs_dist.errors import DataError
    from ccfs_dist.data.inputs import check_present, made_here
    overrides = ["data.source=imagefolder", "data.root=.", "data.distilled=absent_syn", "teacher.checkpoint=absent.pt"]
    with pytest.raises(DataError) as err:
        check_present(load_config(None, overrides))
    assert "authors" not in str(err.value)
    assert "a checkpoint trained on these classes" in str(err.value)
    assert "a distilled folder of these classes" in str(err.value)
    lines = made_here(load_config(None, overrides[:2]), 1000, 10)
    assert len(lines) == 2 and not any("authors" in line for line in lines)
    tiny = made_here(load_config(None, ["data.source=tiny-imagenet", "data.root=."]), 1000, 10)
    assert all(line.endswith("the paper's runs use the authors' files (docs/data.md)") for line in tiny)


def test_torchvision_imagenet_resnet18_state_dict_is_an_imagenet_teacher(tmp_path):
    """configs/imagenet1k_ipc*.yaml step 2: torchvision's ResNet-18 saved with torch.save(model.state_dict())
    loads as `model.name: resnet18_imagenet` over ImageNet-1K's 1,000 classes and predicts the same."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None, num_classes=1000).eval()
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18_imagenet1k.pt"
    torch.save(reference.state_dict(), path)
    ours = build_model({"name": "resnet18_imagenet", "width": 32, "depth": 3, "norm": "batchnorm"}, 1000, 3, 224).eval()
    load_checkpoint(ours, path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))
