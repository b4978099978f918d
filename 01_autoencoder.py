"""(work in progress: the evaluation section below is final; the rest of the lecture is being written)"""
import torch
import torch.nn.functional as F


# ---- 5. Evaluation: how good is a frozen representation? ----

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
    unregularised optimum is at infinity), so a small or few-shot training set needs extra passes."""
    train_x, test_x = train_x.float(), test_x.float()
    mean, std = train_x.mean(0), train_x.std(0, correction=0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    generator = torch.Generator(device="cpu").manual_seed(seed)
    weight = torch.zeros(train_x.shape[1], num_classes, device=train_x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=train_x.device, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr, fused=train_x.device.type == "cuda")
    steps_per_epoch = -(-len(train_x) // batch_size)
    epochs = max(epochs, -(-min_steps // steps_per_epoch))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in range(epochs):
        for idx in torch.randperm(len(train_x), generator=generator).to(train_x.device).split(batch_size):
            logits = train_x[idx] @ weight + bias                            # (B, D) @ (D, C) -> (B, C)
            loss = F.cross_entropy(logits, train_y[idx]) + weight_decay * weight.square().sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        return topk_accuracy(test_x @ weight + bias, test_y, ks)


@torch.no_grad()
def knn_classify(train_x, train_y, test_x, test_y, num_classes, k=20, temperature=0.07, ks=(1, 5), chunk=1024):
    """Weighted kNN on cosine similarity (Wu et al. 2018, Eq. 7): each of the k nearest training points
    votes for its class with weight exp(similarity / temperature). Returns {"top1", "top5"}."""
    train_x, test_x = F.normalize(train_x.float(), dim=1), F.normalize(test_x.float(), dim=1)
    votes = []
    for queries in test_x.split(chunk):
        similarity, neighbour = (queries @ train_x.T).topk(min(k, len(train_x)), dim=1)  # (Q, N) -> (Q, k)
        weights = (similarity / temperature).exp()                                         # (Q, k)
        one_hot = F.one_hot(train_y[neighbour], num_classes).float()                       # (Q, k, C)
        votes.append((weights[:, :, None] * one_hot).sum(1))                               # (Q, C)
    return topk_accuracy(torch.cat(votes), test_y, ks)
