"""Tests for evaluation.py, the protocol every script reports: top-k accuracy, Wu et al.'s weighted kNN and
retrieval recall@k each against a plain Python loop on seeded inputs of uneven sizes, and the linear probe
against the optimum it must reach (separable data, a full-batch L-BFGS fit), alone and stacked."""
import math

import pytest
import torch
import torch.nn.functional as F

import evaluation


def generator(seed):
    return torch.Generator().manual_seed(seed)


def ranked(values):
    """Indices of a list of numbers from the largest down (the loops' own ordering, no torch.topk)."""
    return sorted(range(len(values)), key=lambda j: -values[j])


# ---- top-k accuracy ----

@pytest.mark.parametrize("rows, classes", [(1, 3), (53, 7), (200, 10)])
def test_topk_accuracy_matches_a_loop(rows, classes):
    g = generator(rows)
    scores = torch.randn(rows, classes, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (rows,), generator=g)
    ks = (1, 3, classes + 2)                                          # a k beyond the classes counts every row
    result = evaluation.topk_accuracy(scores, labels, ks=ks)
    for k in ks:
        hits = sum(int(labels[i]) in ranked(scores[i].tolist())[:k] for i in range(rows))
        assert result[f"top{k}"] == pytest.approx(hits / rows)
    assert result[f"top{classes + 2}"] == 1.0


# ---- weighted kNN (Wu et al. 2018, Eq. 7) ----

def knn_by_loop(train_x, train_y, test_x, test_y, classes, k, temperature, ks, centre):
    """Wu et al.'s vote written out: the k training points of highest cosine similarity each add
    exp(similarity / temperature) to their class; a query scores a hit at k when its label is among its k
    best-voted classes."""
    train, test = train_x.tolist(), test_x.tolist()
    dims = range(len(train[0]))
    mean = [sum(row[d] for row in train) / len(train) if centre else 0.0 for d in dims]
    shift = lambda row: [row[d] - mean[d] for d in dims]
    cosine = lambda a, b: sum(p * q for p, q in zip(a, b)) / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))
    hits = {k_: 0 for k_ in ks}
    for query, label in zip(test, test_y.tolist()):
        similarity = [cosine(shift(query), shift(row)) for row in train]
        votes = [0.0] * classes
        for j in ranked(similarity)[:k]:
            votes[int(train_y[j])] += math.exp(similarity[j] / temperature)
        order = ranked(votes)
        assert votes[order[max(ks) - 1]] > 0, "a tie among classes without votes: pick another seed"
        for k_ in ks:
            hits[k_] += label in order[:k_]
    return {f"top{k_}": hits[k_] / len(test) for k_ in ks}


@pytest.mark.parametrize("centre", [False, True])
@pytest.mark.parametrize("n_train, n_test, k", [(61, 23, 7), (9, 5, 20)])    # the second: k beyond the training set
def test_knn_matches_a_loop_over_wu_et_als_weighted_vote(centre, n_train, n_test, k):
    g = generator(18 + n_train)
    # non-negative features, as after a ReLU: there centring changes which neighbours are nearest
    train_x, test_x = torch.rand(n_train, 6, generator=g), torch.rand(n_test, 6, generator=g)
    train_y, test_y = torch.randint(0, 4, (n_train,), generator=g), torch.randint(0, 4, (n_test,), generator=g)
    result = evaluation.knn_classify(train_x, train_y, test_x, test_y, 4, k=k, temperature=0.1, ks=(1, 2), chunk=8,
                                     centre=centre)
    expected = knn_by_loop(train_x.double(), train_y, test_x.double(), test_y, 4, k, 0.1, (1, 2), centre)
    assert result == pytest.approx(expected)


def test_knn_weights_the_vote_by_similarity():
    # two far neighbours of class 0 against one close neighbour of class 1: counting votes picks class 0,
    # Wu et al.'s exp(similarity / temperature) picks the close one
    train_x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    train_y = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.2]])
    assert evaluation.knn_classify(train_x, train_y, query, torch.tensor([1]), 2, k=3, ks=(1,))["top1"] == 1.0
    assert evaluation.knn_classify(train_x, train_y, query, torch.tensor([0]), 2, k=3, temperature=100.0,
                                   ks=(1,))["top1"] == 1.0


# ---- retrieval recall@k ----

@pytest.mark.parametrize("queries, items", [(1, 4), (41, 27)])
def test_recall_at_k_matches_a_loop(queries, items):
    g = generator(2 + queries)
    similarity = torch.randn(queries, items, generator=g, dtype=torch.float64)
    relevant = torch.rand(queries, items, generator=g) < 0.08
    relevant[torch.arange(min(queries, items)), torch.arange(min(queries, items))] = True
    relevant[-1] = False                                              # a query with no right answer never scores
    ks = (1, 5, items + 3)
    result = evaluation.recall_at_k(similarity, relevant, ks=ks)
    for k in ks:
        hits = sum(any(relevant[q, j] for j in ranked(similarity[q].tolist())[:k]) for q in range(queries))
        assert result[f"r{k}"] == pytest.approx(hits / queries)


# ---- the linear probe ----

def separable(n, g, margin=0.5, dim=32, classes=10):
    """Points whose class is argmax(x W) for a fixed W, kept only where the best class wins by `margin`."""
    w = torch.randn(dim, classes, generator=g)
    x = torch.randn(8 * n, dim, generator=g)
    scores = (x @ w).topk(2, dim=1).values
    keep = (scores[:, 0] - scores[:, 1]) > margin
    return x[keep][:n], (x @ w)[keep][:n].argmax(1)


def test_linear_probe_reaches_the_optimum_on_linearly_separable_data():
    x, y = separable(1500, generator(19))
    assert evaluation.linear_probe(x, y, x, y, 10)["top1"] == 1.0     # separable: the optimum classifies every point


def test_linear_probe_matches_a_full_batch_fit_of_the_same_objective():
    # overlapping classes: the answer is the accuracy of the regularised optimum, which L-BFGS finds on the whole
    # training set; Adam on minibatches with a cosine to 0 stops near it, within a few test points of it
    g = generator(22)
    y = torch.randint(0, 4, (700,), generator=g)
    x = 0.8 * torch.randn(4, 10, generator=g)[y] + torch.randn(700, 10, generator=g) * torch.linspace(0.5, 3, 10)
    x = x * torch.logspace(-2, 2, 10) + 50          # scales and offsets the probe must standardise away
    train, test = slice(0, 500), slice(500, None)
    result = evaluation.linear_probe(x[train], y[train], x[test], y[test], 4, min_steps=1000, ks=(1, 2))
    mean, std = x[train].mean(0), x[train].std(0, correction=0)
    z = ((x - mean) / std).double()
    weight = torch.zeros(10, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z[train] @ weight + bias, y[train]) + 1e-5 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    reference = evaluation.topk_accuracy((z[test] @ weight + bias).detach(), y[test], ks=(1, 2))
    assert 0.5 < reference["top1"] < 0.9                              # neither trivial nor separable
    for k in ("top1", "top2"):
        assert abs(result[k] - reference[k]) <= 6 / 200


def test_stacked_linear_probes_equal_separate_ones():
    # three feature sets of the same images: separable, half noise, pure noise; fitted side by side or alone
    g = generator(21)
    x, y = separable(800, g)
    noise = torch.randn(x.shape, generator=g)
    sets = torch.stack([x, x + 2 * noise, noise])                     # (3, N, D)
    train, test = slice(0, 500), slice(500, None)
    stacked = evaluation.linear_probe(sets[:, train], y[train], sets[:, test], y[test], 10, min_steps=300)
    alone = [evaluation.linear_probe(f[train], y[train], f[test], y[test], 10, min_steps=300) for f in sets]
    assert len({round(r["top1"], 2) for r in alone}) == 3             # three different answers to get right
    for ours, reference in zip(stacked, alone):
        assert abs(ours["top1"] - reference["top1"]) <= 1 / 300 and abs(ours["top5"] - reference["top5"]) <= 1 / 300
