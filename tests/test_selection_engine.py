"""The exact greedy on a precomputed matrix: same picks as a textbook greedy, whatever the path.

Facility location with the matrix in memory keeps every candidate's gain exact by incremental
updates, over windows of columns along a line, taking several disjoint candidates at once; these
tests hold it to a brute-force greedy and to the lazy on-the-fly path, on data without accidental
ties (float64), and check the plumbing around it (input order, reused storage, the line's bound).
"""

from __future__ import annotations

import math

import pytest
import torch

from epic.selection import GradientProxy, facility_location, objective
from epic.selection import facility as fl
from epic.selection.proxy import pairwise_distances


def greedy_reference(x: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    """Textbook greedy in float64: the first medoid minimises the total distance, each next one
    maximises the reduction of the summed nearest-medoid distance (over all points)."""
    d = pairwise_distances(x.double(), x.double())
    d.fill_diagonal_(0)
    first = int(d.sum(1).argmin())
    chosen, gains, m = [first], [-float(d[first].sum())], d[first].clone()
    for _ in range(k - 1):
        g = (m[None, :] - d).clamp(min=0).sum(1)
        g[chosen] = -math.inf
        j = int(g.argmax())
        chosen.append(j)
        gains.append(float(g[j]))
        m = torch.minimum(m, d[j])
    return chosen, gains


def assert_greedy(x: torch.Tensor, medoids: torch.Tensor, gains: torch.Tensor) -> None:
    """Each pick has the best gain available after the picks before it (exact ties may go
    either way) and reports it; in float64."""
    d = pairwise_distances(x.double(), x.double())
    d.fill_diagonal_(0)
    picks = medoids.tolist()
    total = d.sum(1)
    assert total[picks[0]] == pytest.approx(float(total.min()), rel=1e-12)
    m = d[picks[0]].clone()
    for t, j in enumerate(picks[1:], start=1):
        g = (m[None, :] - d).clamp(min=0).sum(1)
        g[picks[:t]] = -math.inf
        assert float(g[j]) == pytest.approx(float(g.max()), rel=1e-9, abs=1e-9), t
        assert float(gains[t]) == pytest.approx(float(g[j]), rel=1e-5, abs=1e-6), t
        m = torch.minimum(m, d[j])


def clustered(n: int, dim: int, seed: int, clusters: int = 12) -> torch.Tensor:
    """Tight clusters at several scales plus a few far points: many disjoint candidate sets,
    narrow windows along the line, and large early updates (as with real proxies)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g, dtype=torch.float64) * 3
    scale = torch.rand(clusters, 1, generator=g, dtype=torch.float64) * 0.5 + 0.01
    which = torch.randint(0, clusters, (n,), generator=g)
    x = centres[which] + scale[which] * torch.randn(n, dim, generator=g, dtype=torch.float64)
    x[:n // 50] += 8 * torch.randn(n // 50, dim, generator=g, dtype=torch.float64)
    return x


@pytest.mark.parametrize("batch_size", [1, 3, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_greedy_picks_the_textbook_greedy_medoids(seed, batch_size):
    x = clustered(300, 5, seed)
    k = 60
    res = facility_location(x, k, optimizer="lazy", batch_size=batch_size)
    assert_greedy(x, res.medoids, res.gains)
    chosen, _ = greedy_reference(x, k)
    assert objective(x, res.medoids) == pytest.approx(objective(x, torch.tensor(chosen)),
                                                      rel=1e-12)


def test_exact_greedy_matches_the_lazy_on_the_fly_path():
    x = clustered(700, 4, seed=5)
    x = x + 1e-3 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0),
                               dtype=x.dtype)
    full = facility_location(x, 90, optimizer="lazy")
    onthefly = facility_location(x, 90, optimizer="lazy", memory_mb=0.5)  # 3.9 MB don't fit
    # Noise breaks accidental ties but not symmetric ones: two far points closer to each other
    # than to any medoid gain exactly m_a + m_b - d(a, b) each, and the two paths' roundings
    # may pick either first (seen on an Intel AVX512 CPU at step 65 of this data).
    d = pairwise_distances(x, x)
    d.fill_diagonal_(0)
    for res in (full, onthefly):
        assert_greedy(x, res.medoids, res.gains)
        nearest = d[:, res.medoids]
        assert torch.allclose(res.min_dist, nearest.min(1).values, atol=1e-9)
        assert torch.allclose(nearest.gather(1, res.assignment[:, None]).squeeze(1),
                              res.min_dist, atol=1e-9)
    assert objective(x, full.medoids) == pytest.approx(objective(x, onthefly.medoids), rel=1e-12)
    differ = (full.medoids != onthefly.medoids).nonzero()
    same = int(differ[0]) if len(differ) else len(full.medoids)
    assert same >= 60  # they part, if at all, only at a tie late in the run
    assert torch.allclose(full.gains, onthefly.gains, rtol=1e-5, atol=1e-6)
    if same == len(full.medoids):
        assert torch.equal(full.assignment, onthefly.assignment)


def test_exact_greedy_on_float32_proxies_reaches_the_float64_greedy_objective():
    # Float32 distances may break near-ties another way; the objective must not suffer.
    x = clustered(800, 10, seed=7)
    k = 80
    res = facility_location(x.float(), k, optimizer="lazy")
    chosen, _ = greedy_reference(x, k)
    f_fast = objective(x, res.medoids)
    f_ref = objective(x, torch.tensor(chosen))
    assert f_fast == pytest.approx(f_ref, rel=1e-6)


def test_results_are_in_the_input_order():
    x = clustered(250, 3, seed=3)
    res = facility_location(x, 40)
    perm = torch.randperm(250, generator=torch.Generator().manual_seed(0))
    shuffled = facility_location(x[perm], 40)
    assert torch.equal(perm[shuffled.medoids], res.medoids)
    assert torch.allclose(res.min_dist[perm], shuffled.min_dist)  # rounding: another order
    # point perm[i] of the input is point i of the shuffled input: same medoid, same position
    assert torch.equal(res.assignment[perm], shuffled.assignment)
    d = pairwise_distances(x, x[res.medoids])  # ~1e-7 where 0 (not centred, uncorrected)
    assert torch.allclose(d.gather(1, res.assignment[:, None]).squeeze(1), res.min_dist,
                          atol=1e-6)
    assert torch.allclose(d.min(1).values, res.min_dist, atol=1e-6)


def test_duplicates_and_k_equal_n_take_every_point_once():
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = torch.cat([x, x[:10]])  # ten exact duplicates: zero gains, ties, equal keys
    res = facility_location(x, 40, optimizer="lazy", batch_size=8)
    assert sorted(res.medoids.tolist()) == list(range(40))
    assert torch.equal(res.assignment[res.medoids], torch.arange(40))
    assert (res.min_dist == 0).all()
    # incremental updates leave rounding (~1e-9 of the first gains) where the gain is zero
    assert (res.gains[1:] >= -1e-6).all() and (res.gains[-10:].abs() < 1e-6).all()


def test_factored_proxies_take_the_same_path_as_their_materialised_vectors():
    g = torch.Generator().manual_seed(6)
    proxy = GradientProxy(torch.randn(200, 4, generator=g, dtype=torch.float64),
                          torch.randn(200, 3, generator=g, dtype=torch.float64))
    res = facility_location(proxy, 30)
    assert_greedy(proxy.materialize(), res.medoids, res.gains)


def test_the_line_never_exceeds_the_distance():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64) * torch.rand(6, generator=g,
                                                                           dtype=torch.float64)
    for pts in (GradientProxy(x - x.mean(0)), GradientProxy(x, x[:, :2].exp())):
        key = fl._line(pts)
        d = pairwise_distances(pts, pts)
        assert ((key[:, None] - key[None, :]).abs() <= d + 1e-12).all()
    assert fl._line(GradientProxy(torch.zeros(5, 3))).eq(0).all()  # identical points: no NaN


def test_reused_matrix_storage_does_not_leak_into_results():
    a = clustered(400, 4, seed=9).float()
    b = clustered(300, 4, seed=10).float()
    first = facility_location(a, 30)
    kept = [t.clone() for t in (first.medoids, first.assignment, first.min_dist, first.gains)]
    assert fl._spare and fl._spare[0].numel() >= 400 * 400  # kept for the next call
    second = facility_location(b, 20)  # built in the same storage
    assert torch.equal(second.medoids, facility_location(b.clone(), 20).medoids)
    for before, now in zip(kept, (first.medoids, first.assignment, first.min_dist, first.gains),
                           strict=True):
        assert torch.equal(before, now)


def test_only_cpu_matrix_storage_is_kept_for_reuse():
    """A GPU round's storage must not be handed to the next CPU round (torch.mm(out=) would
    mix devices; found by a review before any GPU run). The meta device stands in for CUDA."""
    fl._spare.clear()
    gpu_like = fl._Distances.__new__(fl._Distances)
    gpu_like.storage, gpu_like.full = torch.empty(100, device="meta"), None
    gpu_like.release()
    assert fl._spare == []
    facility_location(clustered(200, 4, seed=11).float(), 10)  # a CPU round after it runs
    assert fl._spare and fl._spare[0].device.type == "cpu"
