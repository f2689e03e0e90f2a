"""A CR-FIQA-style quality head on frozen embeddings: the "learned from the embedding" baseline.

CR-FIQA (Boutros et al. 2023) regresses each training image's certainty ratio
``CR = CCS / (NNCCS + 1 + eps)`` (CCS: cosine to its own class centre; NNCCS: the largest cosine
to another class centre) from the FR network's features. ViT-FIQA learns the same target with a
dedicated token inside the network. To compare the two fairly on one model, this module trains
only a small MLP on the model's *frozen* embeddings:

- targets come from the training pool, never from the evaluation set: class centres are the
  normalised mean of the normalised embeddings of each pool identity with at least
  ``min_images`` images, and an image's own centre leaves that image out (with two images per
  person the centre would otherwise be pulled halfway to the image it scores, inflating CCS);
- the head sees the raw (un-normalised) embedding, as CR-FIQA's head sees the BN'd feature, with
  each dimension standardised on the training images; one hidden ReLU layer; SmoothL1 (beta 0.5)
  as in CR-FIQA; Adam; the epoch with the lowest loss on an identity-disjoint 10% of the pool is
  kept.

The fitted head is a few numpy arrays (:class:`facerec.runtime.quality.QualityHead`: ``save`` /
``load`` an ``.npz``); inference needs no torch, and the service runs it for a model whose quality
measure ``facerec fit-quality`` chose to be this head.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facerec.runtime.quality import QualityHead

__all__ = ["QualityHead", "certainty_ratio_targets", "fit_head_on_pool", "sample_identities", "spearman",
           "train_head"]


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def certainty_ratio_targets(embeddings, identities, min_images: int = 2, eps: float = 1e-9,
                            chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(target, used): the CR-FIQA certainty ratio of every image of an identity with at least
    ``min_images`` images (``used`` True), NaN for the others.

    CCS uses the image's class centre computed without the image itself; NNCCS is the maximum
    over the centres of all other eligible identities.
    """
    if min_images < 2:
        raise ValueError("min_images must be >= 2 (a leave-one-out centre needs another image)")
    e = _l2(embeddings)
    ids = np.unique(np.asarray(identities), return_inverse=True)[1]
    counts = np.bincount(ids)
    eligible = np.flatnonzero(counts >= min_images)
    if eligible.size < 2:
        raise ValueError(f"need >= 2 identities with >= {min_images} images, found {eligible.size}")
    used = np.isin(ids, eligible)
    slot = np.full(counts.size, -1)
    slot[eligible] = np.arange(eligible.size)
    sums = np.zeros((eligible.size, e.shape[1]))
    np.add.at(sums, slot[ids[used]], e[used])
    centres = _l2(sums)
    target = np.full(len(e), np.nan)
    rows = np.flatnonzero(used)
    for s in range(0, rows.size, chunk):
        r = rows[s : s + chunk]
        own = slot[ids[r]]
        loo = _l2(sums[own] - e[r])
        ccs = np.sum(e[r] * loo, axis=1)
        cos = e[r] @ centres.T
        cos[np.arange(r.size), own] = -np.inf
        nnccs = cos.max(axis=1)
        target[r] = ccs / (nnccs + 1.0 + eps)
    return target, used


def spearman(a, b) -> float:
    """Spearman rank correlation (ties get their average rank)."""
    from facerec.eval.image_measures import percentile_rank

    return float(np.corrcoef(percentile_rank(a), percentile_rank(b))[0, 1])


def train_head(embeddings, targets, groups=None, hidden: int = 256, epochs: int = 60,
               batch: int = 256, lr: float = 1e-3, weight_decay: float = 1e-4,
               val_fraction: float = 0.1, seed: int = 0, progress: bool = False) -> QualityHead:
    """Fits the head to ``targets`` (NaN targets are ignored). ``groups`` (e.g. identities) keeps
    the validation split group-disjoint. Runs on the CPU in seconds to a few minutes."""
    import torch
    from tqdm import tqdm

    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64).ravel()
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    g = np.arange(len(y)) if groups is None else np.unique(np.asarray(groups)[keep], return_inverse=True)[1]
    if len(y) < 10:
        raise ValueError(f"only {len(y)} usable training targets")
    rng = np.random.default_rng(seed)
    n_groups = int(g.max()) + 1
    val_groups = rng.permutation(n_groups)[: max(1, round(val_fraction * n_groups))]
    val = np.isin(g, val_groups)
    train = ~val
    mean, std = x[train].mean(axis=0), x[train].std(axis=0) + 1e-6
    torch.manual_seed(seed)
    xt = torch.from_numpy(((x - mean) / std).astype(np.float32))
    yt = torch.from_numpy(y.astype(np.float32))
    nn = torch.nn
    net = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, 1))
    with torch.no_grad():
        net[2].bias.fill_(float(y[train].mean()))  # start at the mean target
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.SmoothL1Loss(beta=0.5)
    tr_idx, va_idx = np.flatnonzero(train), np.flatnonzero(val)
    best = (np.inf, None, -1)
    gen = torch.Generator().manual_seed(seed)
    for epoch in tqdm(range(epochs), desc="quality head", disable=not progress):
        net.train()
        perm = tr_idx[torch.randperm(tr_idx.size, generator=gen).numpy()]
        for s in range(0, perm.size, batch):
            b = torch.from_numpy(perm[s : s + batch])
            loss = loss_fn(net(xt[b]).squeeze(1), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            v = float(loss_fn(net(xt[va_idx]).squeeze(1), yt[va_idx]))
        if v < best[0]:
            best = (v, {k: t.detach().clone() for k, t in net.state_dict().items()}, epoch)
    net.load_state_dict(best[1])
    with torch.no_grad():
        pred_val = net(xt[va_idx]).squeeze(1).numpy()
    sd = {k: t.numpy().astype(np.float64) for k, t in net.state_dict().items()}
    info = {"train_images": int(train.sum()), "val_images": int(val.sum()), "best_epoch": best[2],
            "val_loss": best[0], "val_spearman": spearman(pred_val, y[val]),
            "hidden": hidden, "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "seed": seed}
    return QualityHead(mean, std, sd["0.weight"].T.copy(), sd["0.bias"], sd["2.weight"][0].copy(),
                       float(sd["2.bias"][0]), info)


def sample_identities(entries, max_images: int | None, seed: int = 0) -> list:
    """Whole identities of ``entries`` ((relative path, identity) pairs), in a seeded random order,
    until ``max_images`` images (all of them when None). Only identities with 2 or more images count:
    a single image has no leave-one-out centre and no identity centre to be a neighbour."""
    by_name: dict[str, list] = {}
    for entry in entries:
        by_name.setdefault(entry[1], []).append(entry)
    groups = [g for _, g in sorted(by_name.items()) if len(g) >= 2]
    if max_images is None:
        return [e for g in groups for e in g]
    chosen: list = []
    for i in np.random.default_rng(seed).permutation(len(groups)):
        if len(chosen) >= max_images:
            break
        chosen += groups[i]
    return chosen


def fit_head_on_pool(embedder, pool_root, cache=None, seed: int = 0, batch: int = 64,
                     progress: bool = True, max_images: int | None = None, **train_kw) -> QualityHead:
    """Embeds an aligned pool tree ``<root>/<identity>/<image>`` with ``embedder`` (a
    ``facerec.eval.embedder.Embedder``; unflipped, optionally cached), computes the certainty
    ratio targets and trains the head. ``max_images``: a sample of whole identities
    (:func:`sample_identities`) instead of the whole tree."""
    from facerec.data.folders import scan_identity_folders
    from facerec.eval.embedder import embed_cached

    root = Path(pool_root)
    entries = scan_identity_folders(root)
    if max_images is not None:
        entries = sample_identities(entries, max_images, seed)
    if not entries:
        raise ValueError(f"no images under {root}")
    es = embed_cached(embedder, [root / rel for rel, _ in entries], cache, flip=False, batch=batch,
                      progress=progress)
    names = [n for _, n in entries]
    target, used = certainty_ratio_targets(es.embedding, names)
    head = train_head(es.embedding, target, groups=names, seed=seed, progress=progress, **train_kw)
    head.info.update(pool=str(root), pool_images=len(entries), target_images=int(used.sum()),
                     target_identities=len({n for n, u in zip(names, used, strict=True) if u}),
                     target="CR = CCS / (NNCCS + 1 + 1e-9); own centre without the image; "
                            "identities with >= 2 images")
    return head
