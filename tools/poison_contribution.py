r"""Which gradient-matching poisons carry the attack, and which scores find them?

For every trial of a gradient-matching attack in an ``epic bench`` folder whose victims start
from the bench's surrogate (fine-tuning), takes each poison's *contribution* on that model:
``<grad of its training loss, grad of the target's adversarial loss>`` over all parameters (a
gradient step on the poison lowers the target's adversarial loss by about lr times that).
This uses the target, so no defense can compute it; it shows where the attack sits. It then
ranks the poisoned training set by target-free scores, as a defense's first round would see
it (the surrogate's penultimate features and losses), and reports the share of the poisons'
positive contribution that each score's top ``--top`` of the set holds:

- ``group``: :func:`epic.selection.group_isolation` (k=30), ``epic-plus``'s score outside
  fine-tuning;
- ``loss``: the label's cross-entropy;
- ``misfit``: :func:`epic.selection.neighbourhood_loss` (the mean loss over an example and its
  9 nearest same-class examples, each class's means divided by the square root of their
  median: ``relative=0.5``), ``epic-plus``'s score when fine-tuning;
- ``misfit-plain``: the same mean without the class's scale (``relative=0``, the score's
  first form);
- ``group+misfit``: the larger of the group and misfit-plain percentile ranks (a combination
  tried, not kept).

    OMP_NUM_THREADS=1 python tools/poison_contribution.py --bench runs/bench/e16-a

``--retrain T [T ...]`` also trains, for each trial ``T``, the bench's first victim (the seed
of its undefended replicate 0) on the poisoned set without (a) the poisons among ``group``'s
top and (b) as many poisons taken by contribution, largest first, and reports whether the
target is still hit: is the share of the contribution what decides?
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _bench import open_bench  # noqa: E402
from _common import print_table, save  # noqa: E402
from epic.data import PoisonSet, splice_poisons  # noqa: E402
from epic.evaluation import RunConfig  # noqa: E402
from epic.evaluation.bench import (  # noqa: E402
    TRAIN_KEYS,
    Cell,
    default_data_root,
    surrogate_paths,
)
from epic.evaluation.run import execute_run  # noqa: E402
from epic.models.features import forward_with_features  # noqa: E402
from epic.selection import group_isolation, neighbourhood_loss, percentile_rank  # noqa: E402


def contributions(model: torch.nn.Module, poisons: PoisonSet) -> torch.Tensor:
    """(P,) each poison's gradient dotted with the target's adversarial-loss gradient, over
    every parameter of ``model`` (in eval mode, as the poisons were crafted)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, (p, buffers), (x[None],)), y[None])

    target = grad(loss)(params, poisons.target_image.float() / 255,
                        torch.tensor(poisons.adv_label))
    each = vmap(grad(loss), in_dims=(None, 0, 0))(params, poisons.images.float() / 255,
                                                   poisons.labels)
    return sum((each[k].flatten(1) * target[k].flatten()).sum(1) for k in params)


def hit_without(bench, poisons: PoisonSet, drop: torch.Tensor, trial: int) -> bool:
    """Whether the bench's first victim, trained as its undefended replicate 0 is, on the
    poisoned set without the poisons ``drop`` (a (P,) mask), misclassifies the target as the
    attacker wants."""
    keep = ~drop
    subset = dataclasses.replace(poisons, base_indices=poisons.base_indices[keep],
                                 images=poisons.images[keep], labels=poisons.labels[keep])
    cfg, victim = bench.config, bench.config.victims[0]
    seed = Cell("", "", "", bench.seed, trial).train_seed
    train = {k: victim[k] for k in TRAIN_KEYS if k in victim}
    with tempfile.TemporaryDirectory() as tmp:
        subset.save(Path(tmp) / "poisons.npz")
        root = cfg.data_root or default_data_root(cfg.dataset)
        run = RunConfig(dataset=cfg.dataset, data_root=root,
                        model=victim.get("model", "convnet"), width=victim.get("width"),
                        poisons=str(Path(tmp) / "poisons.npz"), train_slice=cfg.train_slice,
                        train_size=victim.get("train_size"),
                        checkpoint=str(surrogate_paths(cfg, bench.folder, bench.seed)[0]),
                        out=str(Path(tmp) / "run"),
                        train={**train, "seed": seed, "progress": False})
        summary, _, _ = execute_run(run, resume=False)
    return bool(summary["attack_success"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True, help="an epic bench folder (fine-tuning)")
    parser.add_argument("--top", type=float, default=0.03, help="share of the set flagged")
    parser.add_argument("--seed", type=int, default=0, help="the bench seed")
    parser.add_argument("--trials", type=int, default=None, help="only the first N trials")
    parser.add_argument("--attack", default=None,
                        help="the attack's label (default: the config's first gradient matching)")
    parser.add_argument("--retrain", type=int, nargs="*", default=[],
                        help="trials whose victim is also trained without chosen poisons")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench = open_bench(args.bench, args.seed)
    if bench.config.victims[0].get("scenario") != "finetune":
        parser.error("the bench's first victim must fine-tune the surrogate (scenario: "
                     "finetune): the contributions are taken on the model it starts from")
    attack = args.attack or next((a["label"] for a in bench.config.attacks
                                  if a["name"] == "gradient-matching"), None)
    if attack is None:
        parser.error("the bench has no gradient-matching attack; pass --attack LABEL")
    model = bench.surrogate
    files = sorted(bench.folder.glob(f"poisons/{attack}/seed{args.seed}/trial-*/poisons.npz"))
    files = files[:args.trials] if args.trials else files
    if not files:
        parser.error(f"no poisons in {bench.folder}/poisons: run the bench first")
    trials = []
    for path in files:
        poisons = PoisonSet.load(path)
        poisoned, is_poison = splice_poisons(bench.train, poisons)
        labels = poisoned.labels
        with torch.no_grad():
            logits, feats = (torch.cat(t) for t in zip(*[
                forward_with_features(model, x.float() / 255)
                for x in poisoned.images.split(500)], strict=True))
        contrib = torch.zeros(len(labels))
        contrib[poisons.base_indices] = contributions(model, poisons)
        positive = contrib.clamp(min=0) * is_poison
        loss = F.cross_entropy(logits, labels, reduction="none")
        group = group_isolation(feats, labels, k=30)
        plain = neighbourhood_loss(feats, loss, labels, k=10)
        scores = {"group": group, "loss": loss,
                  "misfit": neighbourhood_loss(feats, loss, labels, k=10, relative=0.5),
                  "misfit-plain": plain,
                  "group+misfit": torch.maximum(group, percentile_rank(plain))}
        flagged = int(args.top * len(labels))  # as epic-plus's cap
        ranked = positive[is_poison].sort(descending=True).values
        total = float(positive.sum()) or 1.0  # no poison helps the attacker: shares are 0
        row = {"trial": int(path.parent.name.split("-")[-1]),
               "top10_share": float(ranked[:10].sum() / total),
               "loss_corr": float(torch.corrcoef(torch.stack(
                   [contrib[is_poison], loss[is_poison]]))[0, 1])}
        tops = {name: score.topk(flagged).indices for name, score in scores.items()}
        for name, top in tops.items():
            row[f"{name}_share"] = float(positive[top].sum() / total)
            row[f"{name}_poisons"] = int(is_poison[top].sum())
        if row["trial"] in args.retrain:
            order = contrib[poisons.base_indices].argsort(descending=True)
            top = torch.zeros(len(labels), dtype=torch.bool)
            top[tops["group"]] = True
            by_group = top[poisons.base_indices]  # poison i is among the group score's top
            by_contrib = torch.zeros(len(order), dtype=torch.bool)
            by_contrib[order[:int(by_group.sum())]] = True
            row["hit_without_group_top"] = hit_without(bench, poisons, by_group, row["trial"])
            row["hit_without_as_many_by_contribution"] = hit_without(bench, poisons, by_contrib,
                                                                     row["trial"])
            print(f"trial {row['trial']}: without the {int(by_group.sum())} poisons of the "
                  f"group score's top: {'HIT' if row['hit_without_group_top'] else 'miss'}; "
                  f"without the {int(by_group.sum())} largest contributions: "
                  f"{'HIT' if row['hit_without_as_many_by_contribution'] else 'miss'}")
        trials.append(row)
        print(f"trial {row['trial']}: " + ", ".join(
            f"{n} {row[f'{n}_share']:.2f} ({row[f'{n}_poisons']})" for n in scores), flush=True)
    names = list(scores)
    mean = lambda key: sum(t[key] for t in trials) / len(trials)  # noqa: E731
    print(f"\n{len(trials)} trials, {int(is_poison.sum())} poisons each; top {args.top:.0%} "
          f"of the set flagged; the 10 largest contributions hold {mean('top10_share'):.0%} "
          f"of the total on average (correlation with the poisons' loss "
          f"{mean('loss_corr'):.2f})")
    print_table(["score", "contribution share flagged (mean)", "trials with >= 90%",
                 "poisons flagged (mean)"],
                [[n, f"{mean(f'{n}_share'):.2f}", sum(t[f"{n}_share"] >= 0.9 for t in trials),
                  f"{mean(f'{n}_poisons'):.1f}"] for n in names])
    path = save("poison_contribution", {"trials": trials, "bench": str(bench.folder),
                                        "top": args.top}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
