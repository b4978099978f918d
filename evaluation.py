"""The evaluation protocol every script shares: how good is a frozen representation, and how well do two
embeddings find each other? Plain functions of tensors, imported as `import evaluation`.

  topk_accuracy   share of rows whose label is among the k highest scores
  linear_probe    multinomial logistic regression on frozen features (the standard protocol of SimCLR, Sec. 4)
  knn_classify    weighted kNN on cosine similarity (Wu et al. 2018, Eq. 7)
  recall_at_k     retrieval recall@k: a relevant item among a query's k most similar
"""
import torch
import torch.nn.functional as F


def topk_accuracy(scores, labels, ks=(1, 5)):
    """Share of rows whose true label is among the k highest scores. scores (N, C), labels (N,)."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices          # (N, k)
    hits = top == labels[:, None]                                            # (N, k)
    return {f"top{k}": hits[:, :k].any(1).float().mean().item() for k in ks}


def linear_probe(train_x, train_y, test_x, test_y, num_classes, epochs=30, batch_size=1024, lr=1e-2,
                 weight_decay=1e-5, ks=(1, 5), seed=0, min_steps=2000):
    """Multinomial logistic regression on frozen features, trained with Adam on standardised inputs.
    train_x (N, D), test_x (M, D). Returns {"top1", "top5"} on the test set.

    It runs `epochs` passes, or more when those give fewer than `min_steps` Adam steps: Adam moves a
    weight by at most about `lr` a step, and the optimum can lie far out (on separable data the
    unregularised optimum is at infinity), so a small or few-shot training set needs extra passes.

    A stack of S feature sets of the same images, train_x (S, N, D) and test_x (S, M, D), trains S independent
    probes side by side and returns a list of S results: one batched step costs about what one probe's step
    costs, since on a GPU the launches of its small kernels, not the arithmetic, set the pace."""
    stacked = train_x.dim() == 3
    train_x, test_x = train_x.float(), test_x.float()
    if not stacked:
        train_x, test_x = train_x[None], test_x[None]                       # (S, N, D), S = 1
    mean, std = train_x.mean(1, keepdim=True), train_x.std(1, correction=0, keepdim=True) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    generator = torch.Generator(device="cpu").manual_seed(seed)
    S, N, D = train_x.shape
    weight = torch.zeros(S, D, num_classes, device=train_x.device, requires_grad=True)
    bias = torch.zeros(S, 1, num_classes, device=train_x.device, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr, fused=train_x.device.type == "cuda")
    steps_per_epoch = -(-N // batch_size)
    epochs = max(epochs, -(-min_steps // steps_per_epoch))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in range(epochs):
        for idx in torch.randperm(N, generator=generator).to(train_x.device).split(batch_size):
            logits = train_x[:, idx] @ weight + bias                        # (S, B, D) @ (S, D, C) -> (S, B, C)
            # the mean over all S*B rows, times S: each probe's own mean loss, summed, so each gets its own gradient
            loss = (S * F.cross_entropy(logits.flatten(0, 1), train_y[idx].repeat(S))
                    + weight_decay * weight.square().sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        results = [topk_accuracy(scores, test_y, ks) for scores in test_x @ weight + bias]   # S of (M, C)
    return results if stacked else results[0]


@torch.no_grad()
def knn_classify(train_x, train_y, test_x, test_y, num_classes, k=20, temperature=0.07, ks=(1, 5), chunk=1024,
                 centre=False):
    """Weighted kNN on cosine similarity (Wu et al. 2018, Eq. 7): each of the k nearest training points
    votes for its class with weight exp(similarity / temperature). Returns {"top1", "top5"}.
    centre=True subtracts the training mean before the cosine (Wang et al. 2019, SimpleShot's CL2N): features
    after a ReLU are all non-negative, so their shared mean direction otherwise dominates every cosine."""
    train_x, test_x = train_x.float(), test_x.float()
    if centre:
        mean = train_x.mean(0)
        train_x, test_x = train_x - mean, test_x - mean
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    votes = []
    for queries in test_x.split(chunk):
        similarity, neighbour = (queries @ train_x.T).topk(min(k, len(train_x)), dim=1)  # (Q, N) -> (Q, k)
        weights = (similarity / temperature).exp()                                         # (Q, k)
        one_hot = F.one_hot(train_y[neighbour], num_classes).float()                       # (Q, k, C)
        votes.append((weights[:, :, None] * one_hot).sum(1))                               # (Q, C)
    return topk_accuracy(torch.cat(votes), test_y, ks)


def recall_at_k(similarity, relevant, ks=(1, 5, 10)):
    """Share of queries with a relevant item among their k most similar. similarity, relevant (Q, N)."""
    top = similarity.topk(min(max(ks), similarity.shape[1]), dim=1).indices      # (Q, k)
    hits = relevant.gather(1, top)                                                # (Q, k) bool
    return {f"r{k}": hits[:, :k].any(1).float().mean().item() for k in ks}
