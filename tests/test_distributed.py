"""Several processes on CPU (gloo), as ``torchrun --nproc_per_node 2`` starts them.

One module fixture spawns 2 processes with the environment torchrun would give them; they
run every scenario below in turn and hand their results back as files in a tmp folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

import conftest
from epic import _distributed as dist
from epic.data import load_split
from epic.defenses import EpicDefense
from epic.selection import EPIC
from epic.training import TrainConfig, Trainer

WORLD = 2
CONFIG = dict(batch_size=64, lr=0.05, augment="none", progress=False, device="cpu",
              eval_batch_size=256)


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _entry(rank, world, ports, out, state):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out = Path(out)
    assert dist.init_from_env(backend="gloo", timeout=120)  # a hang fails instead
    result = {"helpers": _helpers(rank), "data": _data(rank), "epic": _epic_rounds(state),
              "train": _train(rank, out), "plus": _plus(state),
              "filter": _filter()}
    dist.shutdown()
    os.environ["MASTER_PORT"] = str(ports[1])  # the command joins a group of its own
    result["cli"] = _cli(out)
    torch.save(result, out / f"result{rank}.pt")


@pytest.fixture(scope="module")
def state(digits):
    """Weights after one epoch: proxies with some structure for the selection tests."""
    trainer = Trainer(tiny_model(), digits[0], config=TrainConfig(epochs=1, **CONFIG))
    trainer.fit()
    return trainer.model.state_dict()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, state):
    """Start 2 processes once (each takes seconds to import torch); each runs every scenario
    below and saves its results. An exception in one process stops both and fails here."""
    out = tmp_path_factory.mktemp("distributed")
    mp.start_processes(_entry, args=(WORLD, _free_ports(2), str(out), state), nprocs=WORLD,
                       start_method="spawn")
    return out, [torch.load(out / f"result{r}.pt", weights_only=False) for r in range(WORLD)]


def tiny_model(state=None):
    """conftest's narrow digits ConvNet (seed 0, the model's default normalisation), with
    ``state`` loaded when given."""
    model = conftest.tiny_model(mean=None, std=None)
    if state is not None:
        model.load_state_dict(state)
    return model


# ----------------------------------------------------------------------------- helpers
def _helpers(rank):
    rows = torch.arange(6.0).reshape(3, 2) + 10 * rank
    first = torch.arange(3.0).reshape(3, 1, 1) if rank == 0 else torch.empty(0)
    mask = torch.tensor([rank == 0, rank == 1, True])
    return {
        "rank": dist.rank(), "world": dist.world_size(), "main": dist.is_main(),
        "varlen": dist.all_gather_varlen(rows[: rank + 1]),
        "one_empty": dist.all_gather_varlen(first),
        "ints": dist.all_gather_varlen(torch.arange(rank + 2) + 100 * rank),
        "broadcast": dist.broadcast(torch.full((4,), float(rank + 1)), 0),
        "from_1": dist.broadcast(torch.full((2,), rank, dtype=torch.long), 1),
        "mask": dist.broadcast(mask, 0),
        "sum": dist.all_reduce_sum(torch.tensor([rank + 1.0])),
    }


def test_helpers_are_the_identity_in_one_process():
    x = torch.arange(4)
    assert not dist.is_distributed() and not dist.init_from_env()
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    assert dist.all_gather_varlen(x) is x and dist.broadcast(x) is x
    assert dist.all_reduce_sum(x) is x
    dist.barrier()


@pytest.mark.slow
def test_gather_broadcast_and_sum_across_two_processes(ranks):
    for rank, res in enumerate(r["helpers"] for r in ranks[1]):
        assert (res["rank"], res["world"], res["main"]) == (rank, 2, rank == 0)
        expected = torch.cat([torch.arange(2.0)[None], torch.arange(4.0).reshape(2, 2) + 10])
        assert torch.equal(res["varlen"], expected)  # 1 row from rank 0, 2 from rank 1
        assert torch.equal(res["one_empty"], torch.arange(3.0).reshape(3, 1, 1))
        assert torch.equal(res["ints"], torch.tensor([0, 1, 100, 101, 102]))
        assert torch.equal(res["broadcast"], torch.ones(4))
        assert torch.equal(res["from_1"], torch.ones(2, dtype=torch.long))
        assert torch.equal(res["mask"], torch.tensor([True, False, True]))
        assert torch.equal(res["sum"], torch.tensor([3.0]))


def _data(rank):
    images = torch.full((6, 1, 8, 8), 10 * rank, dtype=torch.uint8)
    split = SimpleNamespace(images=images, labels=torch.arange(6) + rank)
    trainer = Trainer(tiny_model(), split, config=TrainConfig(epochs=1, **CONFIG))
    return {"images": trainer.images, "labels": trainer.labels, "caller": images}


@pytest.mark.slow
def test_every_rank_trains_on_rank_0_data_and_the_callers_is_untouched(ranks):
    for rank, res in enumerate(r["data"] for r in ranks[1]):
        assert (res["images"] == 0).all() and torch.equal(res["labels"], torch.arange(6))
        assert (res["caller"] == 10 * rank).all()


def test_selecting_classes_separately_gives_the_whole_selection():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    x = torch.randn(300, 4, generator=g) + labels[:, None] * 3.0
    x[:6] += 20 * torch.randn(6, 4, generator=g)  # isolated points in every class
    for optimizer in ("lazy", "stochastic"):
        epic = EPIC(subset_fraction=0.1, optimizer=optimizer, seed=3)
        full = epic.select(x, labels)
        parts = [epic.select(x, labels, classes=c) for c in ([0, 2], torch.tensor([1]))]
        assert full.num_dropped > 0
        dropped = torch.cat([p.dropped for p in parts]).sort().values
        assert torch.equal(dropped, full.dropped), optimizer
        medoids = torch.cat([p.medoids for p in parts]).sort().values
        assert torch.equal(medoids, full.medoids.sort().values), optimizer
        only_1 = parts[1]
        assert only_1.keep[labels != 1].all() and torch.isin(only_1.medoids, (labels == 1)
                                                             .nonzero().squeeze(1)).all()
        others = (labels != 1).nonzero().squeeze(1)
        assert torch.equal(only_1.assignment[others], others)  # not clustered: their own
        assert epic.select(x, labels, classes=[7]).medoids.numel() == 0  # absent: ignored


# -------------------------------------------------------------------------- EPIC round
ROUNDS = {"lazy": dict(optimizer="lazy", proxy="logits"),
          "stochastic": dict(optimizer="stochastic", proxy="last-layer")}


def _epic_round(state, train, options):
    trainer = Trainer(tiny_model(state), train, config=TrainConfig(epochs=1, **CONFIG))
    defense = EpicDefense(warmup=0, subset_fraction=0.2, **options)
    defense.on_train_start(trainer)
    defense.on_epoch_start(trainer, 0)
    return {"active": trainer.active, "round": defense.rounds[0]}


def _epic_rounds(state):
    train = load_split("digits", None, train=True)
    return {name: _epic_round(state, train, options) for name, options in ROUNDS.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ROUNDS))
def test_distributed_epic_round_keeps_what_one_process_keeps(name, ranks, state, digits):
    train = digits[0]
    reference = _epic_round(state, train, ROUNDS[name])
    assert 0 < reference["round"]["dropped_this_round"] < len(train) // 4
    for rank, res in enumerate(r["epic"][name] for r in ranks[1]):
        assert torch.equal(res["active"], reference["active"]), rank
        for key in ("medoids", "dropped_this_round", "kept", "pool"):
            assert res["round"][key] == reference["round"][key], (rank, key)


# ---------------------------------------------------------------------------- training
def _train(rank, out):
    train = load_split("digits", None, train=True)
    cfg = TrainConfig(epochs=2, **{**CONFIG, "augment": "crop-flip", "crop_padding": 1})
    trainer = Trainer(tiny_model(), train, config=cfg, out_dir=out / f"rank{rank}",
                      callbacks=[EpicDefense(warmup=1, interval=1, subset_fraction=0.2)])
    trainer.fit()
    return {"state": trainer.model.state_dict(), "active": trainer.active,
            "history": trainer.history, "generator": trainer.generator.get_state(),
            "unwrapped": trainer.train_module is trainer.model}


@pytest.mark.slow
def test_two_process_training_agrees_and_only_rank_0_writes(ranks):
    out, (first, second) = ranks[0], [r["train"] for r in ranks[1]]
    assert first["unwrapped"] and second["unwrapped"]
    assert first["state"].keys() == second["state"].keys()
    for key, value in first["state"].items():  # weights and batch-norm statistics
        assert torch.equal(value, second["state"][key]), key
    assert torch.equal(first["active"], second["active"])
    assert torch.equal(first["generator"], second["generator"])
    history = first["history"]
    assert [h["active"] for h in history] == [h["active"] for h in second["history"]]
    assert history[0]["active"] == 1347 and history[1]["active"] < 1347  # EPIC dropped some
    assert history[1]["active"] == int(first["active"].sum())
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert history[0]["train_loss"] == second["history"][0]["train_loss"]  # summed over ranks
    assert sorted(p.name for p in (out / "rank0").iterdir()) == ["checkpoint.pt",
                                                                 "metrics.jsonl"]
    assert not (out / "rank1").exists()
    saved = torch.load(out / "rank0" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(v, first["state"][k]) for k, v in saved["model"].items())


def _plus(state):
    """epic-plus fine-tuning: after its first round it predicts only the dropped examples,
    fewer than one inference batch, so one rank runs no batch of that pass."""
    from epic.defenses import create_defense

    train = load_split("digits", None, train=True)
    plus = create_defense("epic-plus", fraction=0.05, patience=2)
    cfg = TrainConfig(epochs=4, scenario="finetune", milestones=(), **CONFIG)
    trainer = Trainer(tiny_model(state), train, config=cfg, callbacks=[plus])
    trainer.fit()
    return {"active": trainer.active, "passes": [r["proxy_pass"] for r in plus.rounds]}


@pytest.mark.slow
def test_epic_plus_rounds_with_fewer_batches_than_ranks_agree(ranks):
    first, second = [r["plus"] for r in ranks[1]]
    assert first["passes"][1:] and set(first["passes"][1:]) == {"training-features"}
    assert first["passes"] == second["passes"]
    assert torch.equal(first["active"], second["active"]) and not first["active"].all()


def _filter():
    """Deep k-NN from scratch, the reference protocol: inside its hook a copy of the model
    trains to the end (``Trainer.train_copy``, itself distributed), then the run trains."""
    from epic.defenses import create_defense

    train = load_split("digits", None, train=True)
    knn = create_defense("deep-knn", k=10)
    trainer = Trainer(tiny_model(), train, config=TrainConfig(epochs=2, milestones=(), **CONFIG),
                      callbacks=[knn])
    trainer.fit()
    return {"active": trainer.active, "state": trainer.model.state_dict()}


@pytest.mark.slow
def test_a_filter_that_trains_a_copy_first_agrees_across_ranks(ranks):
    first, second = [r["filter"] for r in ranks[1]]
    assert torch.equal(first["active"], second["active"]) and not first["active"].all()
    for key, value in first["state"].items():
        assert torch.equal(value, second["state"][key]), key


# ---------------------------------------------------------------------------------- CLI
def _cli(out):
    from epic.cli.main import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_:
        main(["train", "--epochs", "2", "--batch-size", "64", "--lr", "0.05", "--interval",
              "1", "--train-size", "400", "--device", "cpu", "--no-progress", "--out",
              str(out / "run")])
    return {"code": exit_.value.code, "printed": printed.getvalue(),
            "distributed": dist.is_distributed()}


@pytest.mark.slow
def test_epic_train_under_torchrun_environment(ranks):
    out, (first, second) = ranks[0], [r["cli"] for r in ranks[1]]
    assert first["code"] == second["code"] == 0
    assert not first["distributed"] and not second["distributed"]  # left the group at exit
    assert "clean test accuracy" in first["printed"] and second["printed"] == ""
    run = out / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.yaml",
                                                     "metrics.jsonl", "summary.json"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_examples"] == 400 and summary["defense_summary"]["rounds"] == 1
