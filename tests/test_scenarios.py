"""Model files, pretraining, and the transfer and fine-tune scenarios."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from epic import DefenseSpec, EpicError
from epic.evaluation import RunConfig, execute_run, pretrain
from epic.evaluation.run import parse_slice
from epic.models import create_model, find_classifier, load_model, read_model_spec, save_model
from epic.training import TrainConfig

FAST = TrainConfig(epochs=3, batch_size=64, lr=0.05, progress=False)


@pytest.fixture(scope="module")
def surrogate(tmp_path_factory):
    path = tmp_path_factory.mktemp("sur") / "surrogate.pt"
    summary = pretrain(RunConfig(out=str(path) + ".run", train=FAST), path)
    assert summary["clean_test_acc"] > 0.5
    return path


def test_model_file_round_trip(tmp_path):
    spec = {"name": "convnet", "num_classes": 10, "in_channels": 1, "mean": [0.3], "std": [0.4]}
    model = create_model("convnet", num_classes=10, in_channels=1, mean=[0.3], std=[0.4])
    save_model(tmp_path / "m.pt", model, spec, metadata={"note": "x"})
    loaded = load_model(tmp_path / "m.pt")
    x = torch.rand(3, 1, 8, 8)
    model.eval()
    loaded.eval()
    assert torch.equal(model(x), loaded(x))
    assert read_model_spec(tmp_path / "m.pt") == (spec, {"note": "x"})
    new_head = load_model(tmp_path / "m.pt", num_classes=4)
    assert new_head(x).shape == (3, 4)


@pytest.mark.parametrize("content, match", [(None, "does not exist"),
                                            (b"garbage", "cannot read model file")])
def test_bad_model_files(tmp_path, content, match):
    path = tmp_path / "m.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(EpicError, match=match):
        load_model(path)


def test_transfer_trains_only_a_fresh_head(surrogate, tmp_path):
    cfg = RunConfig(out=str(tmp_path / "t"), checkpoint=str(surrogate),
                    model="resnet20",  # ignored: the checkpoint fixes the architecture
                    defense=DefenseSpec("epic", {"warmup": 1, "interval": 1}),
                    train=replace(FAST, scenario="transfer", lr=0.01))
    summary, trainer, _ = execute_run(cfg, resume=False)
    pretrained = load_model(surrogate)
    head = find_classifier(trainer.model)
    for (name, a), b in zip(pretrained.state_dict().items(),
                            trainer.model.state_dict().values(), strict=True):
        if name.endswith(("fc.weight", "fc.bias")):
            assert not torch.equal(a, b.cpu()), name  # the head is retrained
        else:
            assert torch.equal(a, b.cpu()), name  # the extractor (and its BN stats) is frozen
    assert all(p.requires_grad == (p is head.weight or p is head.bias)
               for p in trainer.model.parameters())
    assert trainer.cache is not None and trainer.cache.shape == (len(trainer.labels),
                                                                 head.in_features)
    assert summary["clean_test_acc"] > 0.5
    assert summary["model"] == "convnet"  # what actually ran


def test_finetune_changes_the_extractor(surrogate, tmp_path):
    cfg = RunConfig(out=str(tmp_path / "f"), checkpoint=str(surrogate),
                    defense=DefenseSpec("none"),
                    train=replace(FAST, epochs=1, scenario="finetune", lr=0.01))
    _, trainer, _ = execute_run(cfg, resume=False)
    before = load_model(surrogate).state_dict()
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before
               if "features.0.weight" in k)


def test_pretrained_scenarios_need_a_checkpoint(tmp_path):
    with pytest.raises(EpicError, match="--checkpoint"):
        execute_run(RunConfig(out=str(tmp_path), train=replace(FAST, scenario="transfer")))


def test_train_slice():
    assert parse_slice("0:5", 10).tolist() == [0, 1, 2, 3, 4]
    assert parse_slice("7:", 10).tolist() == [7, 8, 9]
    for bad in ("5", "a:b", "5:3", "0:11"):
        with pytest.raises(EpicError, match="train_slice"):
            parse_slice(bad, 10)
