"""The EPIC selection core: greedy optimality against brute force, isolation, invariants, input."""

from __future__ import annotations

import ast
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epic import EPIC, SelectionResult, gradient_proxy
from epic._errors import EpicError
from epic.selection import GradientProxy, SelectionSchedule, facility_location, objective
from epic.selection.proxy import pairwise_distances


def brute_force_greedy(x: torch.Tensor, k: int, metric: str = "euclidean") -> list[int]:
    """Textbook greedy on the explicit matrix, in float64: argmax of F(S + j) over all j."""
    d = pairwise_distances(x.double(), x.double(), metric=metric)
    c0 = float(d.max())
    chosen: list[int] = []
    best = torch.zeros(len(x), dtype=torch.float64)  # max_{j in S} (c0 - d) so far; F(empty) = 0
    for _ in range(k):
        values = torch.clamp(c0 - d, min=0).maximum(best[None, :]).sum(1)  # F(S + j) for each j
        values[chosen] = -math.inf
        j = int(values.argmax())
        chosen.append(j)
        best = torch.maximum(best, c0 - d[j])
    return chosen


@settings(max_examples=60, deadline=None, derandomize=True)
@given(n=st.integers(2, 60), dim=st.integers(2, 6), frac=st.floats(0.02, 1.0),
       seed=st.integers(0, 10_000), metric=st.sampled_from(["euclidean", "cosine"]))
def test_lazy_greedy_matches_brute_force_objective(n, dim, frac, seed, metric):
    # float64 on both sides: in float32, near-ties (gains within rounding) may legitimately be
    # broken differently, giving another greedy path with a slightly different objective.
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    k = max(1, min(n, round(frac * n)))
    fast = facility_location(x, k, metric=metric, optimizer="lazy", batch_size=3)
    slow = brute_force_greedy(x, k, metric)
    f_fast = objective(x, fast.medoids, metric=metric)
    f_slow = objective(x, torch.tensor(slow), metric=metric)
    assert f_fast == pytest.approx(f_slow, rel=1e-5, abs=1e-4)


def test_exact_ties_still_give_greedy_gains():
    # In 1-D, gains are piecewise linear and tie exactly; any tie-break is a valid greedy run,
    # so each pick's gain must equal the best gain available at that step.
    x = torch.randn(8, 1, generator=torch.Generator().manual_seed(0)).double()
    res = facility_location(x, 4)
    d = pairwise_distances(x, x)
    mind = d[res.medoids[0]]
    for t in range(1, 4):
        gains = (mind[None] - d).clamp(min=0).sum(1)
        assert float(res.gains[t]) == pytest.approx(float(gains.max()), abs=1e-5)
        mind = torch.minimum(mind, d[res.medoids[t]])


def test_chunked_and_precomputed_paths_pick_the_same_medoids():
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(1))
    full = facility_location(x, 40)
    chunked = facility_location(x, 40, memory_mb=0.05)  # far too small for the 400x400 matrix
    assert torch.equal(full.medoids, chunked.medoids)
    assert torch.equal(full.assignment, chunked.assignment)


def test_on_the_fly_row_sums_over_several_column_blocks_match_the_matrix():
    """3,000 points without the matrix: row sums go over several cache-sized column blocks
    (and several row chunks); the medoids and gains are those of the precomputed path."""
    x = torch.randn(3000, 6, generator=torch.Generator().manual_seed(3))
    full = facility_location(x, 30)
    blocks = facility_location(x, 30, memory_mb=1.0)  # the 36 MB matrix does not fit
    assert torch.equal(full.medoids, blocks.medoids)
    assert torch.equal(full.assignment, blocks.assignment)
    assert torch.allclose(full.gains, blocks.gains, rtol=1e-4)


def test_stochastic_greedy_is_seeded_and_close_to_lazy():
    x = torch.randn(2000, 10, generator=torch.Generator().manual_seed(2))
    a, b = (facility_location(x, 100, optimizer="stochastic",
                              generator=torch.Generator().manual_seed(5)) for _ in range(2))
    lazy = facility_location(x, 100, optimizer="lazy")
    assert torch.equal(a.medoids, b.medoids)
    assert len(set(a.medoids.tolist())) == 100
    assert objective(x, a.medoids) >= 0.97 * objective(x, lazy.medoids)


def test_assignment_is_nearest_medoid_and_sizes_sum():
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(3))
    res = facility_location(x, 20)
    d = pairwise_distances(x, x[res.medoids])
    assert torch.allclose(d.min(1).values, d.gather(1, res.assignment[:, None]).squeeze(1),
                          atol=1e-4)
    assert torch.equal(res.assignment[res.medoids], torch.arange(20))  # medoids own themselves
    assert int(res.cluster_sizes.sum()) == 300
    assert (res.cluster_sizes >= 1).all()


def planted(n_per_cluster=60, outliers=4, classes=3, seed=0):
    """Dense Gaussian clusters per class plus far-away single points (the 'poisons')."""
    g = torch.Generator().manual_seed(seed)
    xs, ys, iso = [], [], []
    for c in range(classes):
        centre = torch.randn(5, generator=g) * 2
        xs.append(centre + 0.05 * torch.randn(n_per_cluster, 5, generator=g))
        far = centre + 10 + 6 * torch.randn(outliers, 5, generator=g)
        xs.append(far)
        ys.append(torch.full((n_per_cluster + outliers,), c))
    x, y = torch.cat(xs), torch.cat(ys)
    iso = torch.cat([torch.arange(n_per_cluster, n_per_cluster + outliers) +
                     c * (n_per_cluster + outliers) for c in range(classes)])
    return x, y, iso


def test_isolated_points_are_dropped_and_dense_clusters_kept():
    x, y, iso = planted()
    res = EPIC(subset_fraction=0.1).select(x, y)
    assert isinstance(res, SelectionResult)
    assert set(res.dropped.tolist()) == set(iso.tolist())
    assert int((~res.keep).sum()) == len(iso)


def test_selection_invariants():
    x, y, _ = planted(n_per_cluster=50, outliers=3, classes=4, seed=1)
    y = y.clone()
    y[::7] = (y[::7] + 1) % 4  # mix labels so classes are not contiguous blocks
    res = EPIC(subset_fraction=0.2).select(x, y)
    assert res.keep.shape == (len(x),) and res.keep.dtype == torch.bool
    assert res.medoids.dtype == torch.int64 and res.dropped.dtype == torch.int64
    assert res.cluster_sizes.shape == res.medoids.shape
    for c in range(4):
        members = (y == c).nonzero().squeeze(1)
        in_class = torch.isin(res.medoids, members)
        assert int(in_class.sum()) == EPIC(subset_fraction=0.2).budget(len(members))
        assert int(res.cluster_sizes[in_class].sum()) == len(members)
        assert (y[res.assignment[members]] == c).all()  # assigned within the class
    assert torch.isin(res.dropped, res.medoids).all()
    assert torch.equal(res.dropped, (~res.keep).nonzero().squeeze(1))


@pytest.mark.parametrize("threads, processes", [(2, False), (3, False), (2, True)])
def test_classes_in_parallel_give_the_serial_result_and_restore_threads(threads, processes,
                                                                        monkeypatch):
    import epic.selection.epic as epic_module

    # small rounds keep to threads; with the threshold at 0 the classes go to worker processes
    monkeypatch.setattr(epic_module, "_PROCESS_WORK", 0 if processes else 10**18)
    monkeypatch.setattr(epic_module, "_POOLS", {})
    x, y, _ = planted(n_per_cluster=60, outliers=4, classes=5, seed=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = EPIC(subset_fraction=0.1).select(x, y)
        torch.set_num_threads(threads)
        parallel = EPIC(subset_fraction=0.1).select(x, y)
        assert torch.get_num_threads() == threads  # the pool's one thread each is undone
    finally:
        torch.set_num_threads(before)
    for name in ("keep", "medoids", "cluster_sizes", "assignment"):
        assert torch.equal(getattr(serial, name), getattr(parallel, name)), name
    assert bool(epic_module._POOLS) == (processes and sys.platform.startswith("linux"))
    for pool in epic_module._POOLS.values():
        pool.shutdown()


def test_budget_is_proportional_with_a_minimum_of_one():
    epic = EPIC(subset_fraction=0.1)
    assert [epic.budget(n) for n in (1, 4, 5, 10, 5000)] == [1, 1, 1, 1, 500]


def test_cluster_threshold_controls_what_counts_as_isolated():
    x, y, iso = planted(outliers=2)
    x = torch.cat([x, x[iso] + 1e-3])  # each outlier gets a twin: clusters of size 2
    y = torch.cat([y, y[iso]])
    assert EPIC(subset_fraction=0.1, cluster_threshold=1).select(x, y).num_dropped == 0
    res = EPIC(subset_fraction=0.1, cluster_threshold=2).select(x, y)
    # one medoid per pair, its twin joins its cluster, and the whole small cluster goes
    assert res.num_dropped == 2 * len(iso)
    assert not res.keep[iso].any() and not res.keep[-len(iso):].any()
    assert not torch.isin(res.dropped, res.medoids).all()  # members, not only medoids


def test_gradient_proxy_is_softmax_minus_onehot_and_its_gradient():
    logits = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    proxy = gradient_proxy(logits, labels)
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.allclose(proxy.vectors, grad, atol=1e-6)


def test_last_layer_proxy_distances_match_materialised_gradients():
    torch.manual_seed(0)
    layer = torch.nn.Linear(7, 3)
    h = torch.randn(10, 7)
    labels = torch.randint(0, 3, (10,))
    grads = []
    for i in range(10):  # per-example gradient of the last layer (weights and bias), flattened
        layer.zero_grad()
        torch.nn.functional.cross_entropy(layer(h[i:i + 1]), labels[i:i + 1]).backward()
        grads.append(torch.cat([layer.weight.grad.flatten(), layer.bias.grad]))
    explicit = torch.stack(grads)
    proxy = gradient_proxy(layer(h).detach(), labels, features=h)
    assert proxy.dim == explicit.shape[1]
    assert torch.allclose(pairwise_distances(proxy, proxy).pow(2),
                          torch.cdist(explicit, explicit).pow(2), atol=1e-4)
    res = EPIC(subset_fraction=0.3).select(proxy, labels)
    ref = EPIC(subset_fraction=0.3).select(proxy.materialize(), labels)
    assert torch.equal(res.medoids, ref.medoids)


def test_selection_runs_on_the_proxies_device():
    x, y, _ = planted()
    res = EPIC().select(x.to(torch.float64), y)
    assert res.keep.device == x.device


@pytest.mark.parametrize("kwargs, match", [
    ({"subset_fraction": 0.0}, "subset_fraction"),
    ({"subset_fraction": 1.5}, "subset_fraction"),
    ({"cluster_threshold": -1}, "cluster_threshold"),
    ({"metric": "manhattan"}, "metric"),
    ({"optimizer": "magic"}, "optimizer"),
])
def test_bad_options_are_rejected(kwargs, match):
    with pytest.raises(EpicError, match=match):
        EPIC(**kwargs)


@pytest.mark.parametrize("proxies, labels, kw, match", [
    (torch.randn(5), torch.zeros(5, dtype=torch.long), {}, "dimensions"),
    (torch.randn(5, 3), torch.zeros(4, dtype=torch.long), {}, "length 5"),
    (torch.randn(5, 3), torch.tensor([0, 1, 2, 3, -1]), {}, ">= 0"),
    (torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 9]), {"num_classes": 5}, "< num_classes"),
    (torch.randn(5, 3), torch.tensor([0, 0, 1, 1, 3]), {"num_classes": 4}, r"\[2\]"),
    (torch.randn(0, 3), torch.zeros(0, dtype=torch.long), {}, "empty"),
    (torch.randn(5, 3), torch.zeros(5), {}, "integer"),
    (torch.full((5, 3), float("nan")), torch.zeros(5, dtype=torch.long), {}, "NaN"),
    ([[1.0, 2.0]], torch.zeros(1, dtype=torch.long), {}, "torch.Tensor"),
])
def test_bad_input_gets_a_clear_error(proxies, labels, kw, match):
    with pytest.raises(EpicError, match=match):
        EPIC().select(proxies, labels, **kw)


def test_mismatched_proxy_features_are_rejected():
    with pytest.raises(EpicError, match="one row per example"):
        GradientProxy(torch.randn(4, 3), torch.randn(5, 2))
    with pytest.raises(EpicError, match="k must be <="):
        facility_location(torch.randn(3, 2), 4)


def test_schedule_is_the_authors_rule():
    # rounds at e % T == 0, e >= K, up to and including the last decay epoch
    s = SelectionSchedule(warmup=2, interval=3, until=9)
    assert s.epochs(20) == [3, 6, 9]
    assert SelectionSchedule(warmup=1, interval=5, until=35).epochs(40) == [5, 10, 15, 20, 25,
                                                                          30, 35]
    assert SelectionSchedule(warmup=0, interval=1).epochs(3) == [0, 1, 2]
    assert SelectionSchedule(warmup=10, interval=10).epochs(40) == [10, 20, 30]  # no decay
    assert SelectionSchedule(warmup=5, interval=1, until=4).epochs(40) == []  # decay first
    with pytest.raises(EpicError, match="interval"):
        SelectionSchedule(interval=0)


def test_selection_core_imports_only_torch_and_plumbing():
    root = Path(__file__).resolve().parents[1] / "src" / "epic" / "selection"
    forbidden = {"training", "data", "models", "defenses", "attacks", "evaluation", "cli"}
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                parts = (node.module or "").split(".")
                assert not forbidden & set(parts), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not forbidden & set(alias.name.split(".")[1:]), path.name


def test_finiteness_check_goes_block_by_block_and_finds_a_late_nan():
    from epic._validation import _all_finite

    x = torch.zeros(1000, 7)
    assert _all_finite(x, block=64)
    x[-1, -1] = float("inf")  # in the last of many blocks
    assert not _all_finite(x, block=64)
    x[-1, -1] = float("nan")
    assert not _all_finite(x, block=64) and not _all_finite(x)
    assert _all_finite(torch.tensor(1.0)) and not _all_finite(torch.tensor(float("nan")))
