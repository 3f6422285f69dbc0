"""Raters: who agrees with whom, taste clusters, a head per rater and per cluster, and the
stratified ensemble (ssl/raters.py is the command line).

The research agenda: "training classifiers tailored to individual raters", "grouping raters
based on preferences and using stratified averaging may provide a better representation of
the population". Input is a scored manifest with one row per (image, rater): path, score,
rater. Everything trains on one frozen backbone's cached features (the embedding cache that
clean.py and embedding-mode training use), so a set of thousands of ratings takes seconds
after its first embedding.

    agreement   per pair of raters, the images both scored: quadratic-weighted kappa of their
                brackets and the mean signed difference (who is harsher), where they share at
                least --min-shared images
    heads       ridge regression from the standardised features to the score (RidgeCV: the L2
                strength by efficient leave-one-out), one per rater, per cluster, and one
                pooled over every rating. Why ridge: convex, seedless, seconds for thousands of
                rows, and a score head is what the targets sweep found best (docs/experiments.md).
                Each rater's head is also scored by 5-fold cross-validation against their own
                ratings: how predictable that rater is from these features.
    clusters    hierarchical (average linkage) clustering of the raters. --cluster-on heads
                (default): the distance between two raters is the RMS difference of their heads'
                scores over every image of the set, which needs no shared images and sees both
                taste and harshness; --cluster-on agreement: 1 - kappa on shared images (every
                pair must share --min-shared). The number of clusters maximises the silhouette
                (2 .. --max-clusters) unless --clusters is given.
    ensemble    stratified average: sum over clusters of (share of the raters in the cluster) x
                (the cluster head's score). Each rater counts once, however many images they
                scored. The pooled head instead counts ratings, so the busiest raters' taste
                dominates it. With --test (a set scored by the population's consensus, e.g.
                the synthetic set's consensus_test.csv), both are measured against it, with a
                paired bootstrap CI of the difference over test images; with raters in --test,
                each rater's own head, their cluster's and the pooled one against their ratings.

Writes OUT/raters.csv, agreement.csv, raters.json (clusters, silhouettes, shares,
evaluation), summary.md, raters.png (dendrogram and agreement matrix) and heads.npz (the
standardiser and every head's weights: enough to score new features). Bad input (no rater
column, rows without a rater, a rater with too few images, fewer than three raters) raises
RatersError naming the file, the raters and what to do.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.cluster.hierarchy import dendrogram, fcluster, linkage
from scipy.spatial.distance import squareform
from scipy.stats import spearmanr
from sklearn.linear_model import RidgeCV
from sklearn.metrics import adjusted_rand_score, cohen_kappa_score, silhouette_score
from sklearn.model_selection import KFold, cross_val_predict

from .clean import backbone_from, features_of, load_set
from .fileio import write_text_atomic
from .metrics import BRACKETS, HIGH_SCORE_MIN, LOW_BRACKET_MAX, bracket_of

log = logging.getLogger(__name__)

ALPHAS = tuple(np.logspace(-1, 4, 11))  # ridge L2 strengths RidgeCV chooses from (leave-one-out)
DEVIATION_ALPHAS = tuple(np.logspace(0, 6, 13))  # a rater's deviation from the pooled head: up to "offset only"
CV_FOLDS = 5
BOOTSTRAP = 1000
CLUSTER_ON = ("heads", "agreement")


class RatersError(ValueError):
    """A raters.py input or option that cannot work; the message names it and says what to do."""


# --------------------------------------------------------------------------- inputs


@dataclass
class Ratings:
    """One row per rating: image index (into `paths`), rater name, score."""

    paths: list[str]
    image: np.ndarray
    rater: np.ndarray
    score: np.ndarray
    raters: list[str] = field(default_factory=list)

    def of(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.rater == name)


def load_ratings(source, option: str, min_images: int = 0, exclude=(), need_raters: bool = True) -> Ratings:
    """A scored set with a rater column as Ratings; checks the column, empty raters, --exclude
    and --min-images (each rater needs that many images), naming every offender."""
    table = load_set(source, option)
    has = "rater" in table.column_names
    if need_raters and not has:
        raise RatersError(f"{option} {source}: no rater column. raters.py needs one row per (image, rater): "
                          f"path, score, rater (a .csv/.jsonl/.parquet manifest)")
    paths, scores = list(table["path"]), np.asarray(table["score"], dtype=np.float64)
    rater = list(table["rater"]) if has else [None] * len(paths)
    missing = [p for p, r in zip(paths, rater) if r is None or str(r) == ""]
    if has and missing:
        raise RatersError(f"{option} {source}: {len(missing)} row(s) have no rater, e.g. {missing[0]}; give every row "
                          f"a rater (or remove those rows)")
    unknown = sorted(set(exclude) - set(map(str, rater)))
    if unknown:
        raise RatersError(f"--exclude: no rater named {', '.join(unknown)} in {source}")
    keep = np.array([str(r) not in set(exclude) for r in rater], dtype=bool)
    uniq, image = np.unique(np.asarray(paths, dtype=object)[keep], return_inverse=True)
    out = Ratings(list(uniq), image.astype(np.int64), np.asarray([str(r) for r in rater], dtype=object)[keep],
                  scores[keep])
    out.raters = sorted(set(out.rater.tolist())) if has else []
    if has:
        pairs = Counter(zip(out.image.tolist(), out.rater.tolist()))
        repeated = [(out.paths[i], name, n) for (i, name), n in pairs.items() if n > 1]
        if repeated:
            path, name, n = repeated[0]
            log.warning("%s %s: %d (image, rater) pair(s) are scored more than once (e.g. %s by %s, %d times); "
                        "kept as given: agreement reads the rater's mean score of the image, the rater's head trains on "
                        "every row", option, source, len(repeated), path, name, n)
    if has and need_raters:
        _check_counts(out, option, source, min_images)
    return out


def _check_counts(r: Ratings, option: str, source, min_images: int) -> None:
    counts = {name: len(np.unique(r.image[r.of(name)])) for name in r.raters}
    few = {name: n for name, n in counts.items() if n < min_images}
    if few:
        listed = ", ".join(f"{name} ({n} image{'s' if n != 1 else ''})" for name, n in sorted(few.items()))
        raise RatersError(f"{option} {source}: rater(s) with fewer than {min_images} scored images (--min-images): "
                          f"{listed}. A head cannot learn a taste from so few; leave them out with --exclude "
                          f"{' '.join(sorted(few))}, or lower --min-images")
    if len(r.raters) < 3:
        raise RatersError(f"{option} {source}: {len(r.raters)} rater(s) ({', '.join(r.raters) or 'none'}); "
                          f"clustering raters needs at least 3")


# --------------------------------------------------------------------------- agreement


def _per_image(r: Ratings, name: str) -> dict[int, float]:
    """A rater's score per image (the mean where they scored an image more than once)."""
    rows = r.of(name)
    sums: dict[int, list[float]] = {}
    for i, s in zip(r.image[rows], r.score[rows]):
        sums.setdefault(int(i), []).append(float(s))
    return {i: float(np.mean(v)) for i, v in sums.items()}


def qwk(a, b) -> float:
    """Quadratic-weighted kappa of two score lists' brackets (1.0 when both are one same
    bracket everywhere, NaN when kappa is undefined otherwise)."""
    ba, bb = bracket_of(a), bracket_of(b)
    if len(np.unique(np.concatenate([ba, bb]))) == 1:
        return 1.0
    k = cohen_kappa_score(ba, bb, weights="quadratic", labels=BRACKETS)
    return float(k) if np.isfinite(k) else float("nan")


def agreement(r: Ratings, min_shared: int) -> list[dict]:
    """Every pair of raters: shared images, kappa and mean difference (a - b) where they share
    at least `min_shared` images (NaN otherwise)."""
    per = {name: _per_image(r, name) for name in r.raters}
    out = []
    for i, a in enumerate(r.raters):
        for b in r.raters[i + 1:]:
            shared = sorted(set(per[a]) & set(per[b]))
            sa = np.array([per[a][k] for k in shared])
            sb = np.array([per[b][k] for k in shared])
            ok = len(shared) >= max(1, min_shared)
            out.append({"rater_a": a, "rater_b": b, "shared": len(shared),
                        "qwk": qwk(sa, sb) if ok else float("nan"),
                        "mean_diff": float(np.mean(sa - sb)) if ok else float("nan")})
    return out


def agreement_matrix(pairs: list[dict], raters: list[str]) -> np.ndarray:
    idx = {name: i for i, name in enumerate(raters)}
    m = np.eye(len(raters))
    for p in pairs:
        i, j = idx[p["rater_a"]], idx[p["rater_b"]]
        m[i, j] = m[j, i] = p["qwk"]
    return m


# --------------------------------------------------------------------------- heads


@dataclass
class Head:
    """A ridge head on standardised features: score = X_std @ coef + intercept."""

    coef: np.ndarray
    intercept: float
    alpha: float
    rows: int

    def predict(self, Z: np.ndarray) -> np.ndarray:
        return Z @ self.coef + self.intercept


def fit_head(Z: np.ndarray, y: np.ndarray, alphas=None) -> Head:
    m = RidgeCV(alphas=alphas or ALPHAS).fit(Z, y)
    return Head(np.asarray(m.coef_, np.float64), float(m.intercept_), float(m.alpha_), len(y))


def cv_quality(Z: np.ndarray, y: np.ndarray, seed: int) -> dict:
    """How predictable a rater is: 5-fold cross-validated ridge scores against their own."""
    folds = min(CV_FOLDS, len(y))
    if folds < 2:
        return {"cv_qwk": float("nan"), "cv_mae": float("nan")}
    pred = cross_val_predict(RidgeCV(alphas=ALPHAS), Z, y, cv=KFold(folds, shuffle=True, random_state=seed))
    return {"cv_qwk": qwk(np.clip(pred, 0, 10), y), "cv_mae": float(np.mean(np.abs(pred - y)))}


def standardise(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean, std = X.mean(0), X.std(0)
    std = np.where(std > 1e-8, std, 1.0)
    return (X - mean) / std, mean, std


# --------------------------------------------------------------------------- clusters


def head_distances(preds: np.ndarray) -> np.ndarray:
    """RMS difference (score points) between every two raters' head scores over the images."""
    sq = (preds ** 2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * preds @ preds.T, 0.0) / preds.shape[1]
    d = np.sqrt(d2)
    np.fill_diagonal(d, 0.0)
    return (d + d.T) / 2


def agreement_distances(matrix: np.ndarray, raters: list[str], min_shared: int) -> np.ndarray:
    bad = [(raters[i], raters[j]) for i, j in zip(*np.triu_indices(len(raters), 1)) if not np.isfinite(matrix[i, j])]
    if bad:
        a, b = bad[0]
        raise RatersError(f"--cluster-on agreement: {len(bad)} pair(s) of raters share fewer than {min_shared} images "
                          f"(--min-shared) or have an undefined kappa, e.g. {a} and {b}; use --cluster-on heads, which "
                          f"needs no shared images")
    d = 1.0 - matrix
    np.fill_diagonal(d, 0.0)
    return np.maximum(d, 0.0)


def cluster(dist: np.ndarray, k: int | None, max_k: int) -> dict:
    """Average-linkage clusters of the raters: `k` given, or the k in 2..max_k with the best
    silhouette on the distances. Labels are 0-based, numbered by first appearance."""
    n = len(dist)
    tree = linkage(squareform(dist, checks=False), method="average")
    if k is not None and not 1 <= k <= n:
        raise RatersError(f"--clusters must be between 1 and the number of raters ({n}), got {k}")
    sil = {}
    for kk in range(2, min(max_k, n - 1) + 1):
        lab = fcluster(tree, kk, criterion="maxclust")
        if len(set(lab)) > 1:
            sil[kk] = float(silhouette_score(dist, lab, metric="precomputed"))
    chosen = k if k is not None else (max(sil, key=sil.get) if sil else 1)
    raw = fcluster(tree, chosen, criterion="maxclust")
    order = {c: i for i, c in enumerate(dict.fromkeys(raw.tolist()))}
    return {"labels": np.array([order[c] for c in raw]), "k": int(len(order)), "silhouette": sil,
            "chosen_by": "--clusters" if k is not None else "silhouette", "tree": tree}


# --------------------------------------------------------------------------- the whole pass


@dataclass
class Fitted:
    """What the pass learnt: the standardiser, the heads, the clusters."""

    mean: np.ndarray
    std: np.ndarray
    rater_heads: dict[str, Head]
    cluster_heads: list[Head]
    pooled: Head
    labels: np.ndarray
    shares: np.ndarray

    def stratified(self, Z: np.ndarray) -> np.ndarray:
        return sum(s * h.predict(Z) for s, h in zip(self.shares, self.cluster_heads))


def fit_all(Z: np.ndarray, r: Ratings, clusters: dict, mean, std, rater_heads: dict[str, Head], pooled: Head) -> Fitted:
    """Cluster heads on their raters' ratings, the pooled head on every rating, and each
    cluster's share of the raters (each rater counts once)."""
    rows_z = Z[r.image]
    heads = []
    for c in range(clusters["k"]):
        members = {name for name, lab in zip(r.raters, clusters["labels"]) if lab == c}
        sel = np.isin(r.rater, list(members))
        heads.append(fit_head(rows_z[sel], r.score[sel]))
    shares = np.bincount(clusters["labels"], minlength=clusters["k"]) / len(r.raters)
    return Fitted(mean, std, rater_heads, heads, pooled, clusters["labels"], shares)


def rater_table(Z: np.ndarray, r: Ratings, pooled: Head, seed: int) -> tuple[dict[str, Head], list[dict]]:
    """Every rater's head and a row of what they are: images, mean score, CV quality.

    A rater's head is the pooled head plus a ridge *deviation* fitted to their residuals
    (their score minus the pooled head's), its L2 strength chosen by leave-one-out: a rater
    with few ratings, or none that the features explain, is shrunk to the pooled head plus
    an offset (their harshness) instead of fitting noise. (Heads fitted on each rater alone
    were tried first: their differences were estimation noise, and the clustering followed
    how many images each rater had scored, not their taste.)"""
    heads, rows = {}, []
    base = pooled.predict(Z)
    for name in r.raters:
        sel = r.of(name)
        zz, y = Z[r.image[sel]], r.score[sel]
        dev = fit_head(zz, y - base[r.image[sel]], DEVIATION_ALPHAS)
        heads[name] = Head(pooled.coef + dev.coef, pooled.intercept + dev.intercept, dev.alpha, len(sel))
        rows.append({"rater": name, "ratings": len(sel), "images": int(len(np.unique(r.image[sel]))),
                     "mean_score": float(y.mean()), "offset": float(np.mean(y - base[r.image[sel]])),
                     "deviation_alpha": dev.alpha, **cv_quality(zz, y, seed)})
    return heads, rows


def score_metrics(pred: np.ndarray, true: np.ndarray) -> dict:
    """QWK, MAE, Spearman and the false-positive rate of scores (not probabilities)."""
    pred = np.clip(np.asarray(pred, np.float64), 0, 10)
    true = np.asarray(true, np.float64)
    low = bracket_of(true) <= LOW_BRACKET_MAX
    rho = spearmanr(pred, true).statistic if np.std(pred) > 0 and np.std(true) > 0 else float("nan")
    return {"qwk": qwk(pred, true), "mae": float(np.mean(np.abs(pred - true))), "spearman": float(rho),
            "false_positive_rate": float(np.mean(pred[low] >= HIGH_SCORE_MIN)) if low.any() else float("nan"),
            "images": int(len(true))}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, true: np.ndarray, seed: int, n: int = BOOTSTRAP) -> dict:
    """QWK(a) - QWK(b) against `true`, with a 95% percentile CI over resampled images."""
    rng = np.random.default_rng(seed)
    a, b = np.clip(a, 0, 10), np.clip(b, 0, 10)
    diffs = []
    for _ in range(n):
        i = rng.integers(0, len(true), len(true))
        diffs.append(qwk(a[i], true[i]) - qwk(b[i], true[i]))
    lo, hi = np.nanpercentile(diffs, [2.5, 97.5])
    return {"diff": qwk(a, true) - qwk(b, true), "ci95": [float(lo), float(hi)],
            "share_above_0": float(np.mean(np.asarray(diffs) > 0))}


def true_groups(path) -> dict[str, str]:
    """Rater -> group from a synthetic set's synth.json (raters[].group; raters named r00, r01,
    ... as the generator's manifests name them) or a CSV with rater,group columns."""
    p = Path(path)
    try:
        if p.suffix == ".json":
            info = json.loads(p.read_text())
            return {f"r{int(x['rater']):02d}": str(x["group"]) for x in info["raters"]}
        import csv

        with open(p, newline="") as f:
            return {row["rater"]: row["group"] for row in csv.DictReader(f)}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RatersError(f"--true-groups {p}: not a synth.json with rater groups or a rater,group CSV "
                          f"({type(exc).__name__}: {exc})") from None


def features(r: Ratings, source, option: str, bb, accelerator, cache_dir, workers: int, batch_size: int):
    """Features of every distinct image (one embedding each, however many raters), and the
    Ratings with the rows of unreadable images dropped (counted, named in the log)."""
    table = load_set(source, option)
    first = {}
    for i, path in enumerate(table["path"]):
        first.setdefault(path, i)
    uniq = table.select([first[p] for p in r.paths])
    X, rows, skipped = features_of(bb, uniq, accelerator, cache_dir, workers, batch_size)
    if skipped:
        log.warning("raters: %d of %d images of %s could not be read and are left out, e.g. %s", len(skipped),
                    len(r.paths), option, "; ".join(f"{n}: {why}" for n, why in skipped[:3]))
    if len(rows) == 0:
        raise RatersError(f"{option} {source}: none of its {len(r.paths)} images could be read")
    pos = np.full(len(r.paths), -1)
    pos[rows] = np.arange(len(rows))
    keep = pos[r.image] >= 0
    kept = Ratings([r.paths[i] for i in rows], pos[r.image[keep]], r.rater[keep], r.score[keep], list(r.raters))
    return X, kept, len(skipped)


def evaluate(fitted: Fitted, Zt: np.ndarray, t: Ratings, seed: int) -> dict:
    """Against --test: the consensus (each image's mean score over its rows) for the pooled
    head, the stratified ensemble and every cluster head; per rater where --test has raters."""
    truth = np.array([t.score[t.image == i].mean() for i in range(len(t.paths))])
    strat, pooled = fitted.stratified(Zt), fitted.pooled.predict(Zt)
    out = {"consensus": {"stratified": score_metrics(strat, truth), "pooled": score_metrics(pooled, truth),
                         **{f"cluster_{c}": score_metrics(h.predict(Zt), truth)
                            for c, h in enumerate(fitted.cluster_heads)}},
           "stratified_minus_pooled": paired_bootstrap(strat, pooled, truth, seed)}
    per = []
    for name in t.raters:
        sel = t.of(name)
        if name not in fitted.rater_heads or len(sel) < 2:
            continue
        z, y = Zt[t.image[sel]], t.score[sel]
        c = int(fitted.labels[list(fitted.rater_heads).index(name)])
        per.append({"rater": name, "ratings": int(len(sel)), "cluster": c,
                    "own": score_metrics(fitted.rater_heads[name].predict(z), y),
                    "cluster_head": score_metrics(fitted.cluster_heads[c].predict(z), y),
                    "pooled": score_metrics(fitted.pooled.predict(z), y)})
    out["per_rater"] = per
    return out


@dataclass
class RatersResult:
    out: Path
    raters: int
    images: int
    ratings: int
    clusters: int
    summary: dict
    seconds: float


def run_raters(labeled, out, accelerator, model=None, backbone=None, pretrained=None, image_size=None, test=None,
               clusters: int | None = None, cluster_on: str = "heads", max_clusters: int = 8, min_images: int = 20,
               min_shared: int = 10, exclude=(), groups=None, cache_dir=None, workers: int = 2, batch_size: int = 64,
               seed: int = 0) -> RatersResult:
    """The whole pass (see the module docstring); writes everything into `out`."""
    t0 = time.time()
    if cluster_on not in CLUSTER_ON:
        raise RatersError(f"--cluster-on must be one of {', '.join(CLUSTER_ON)}, got {cluster_on!r}")
    if max_clusters < 2:
        raise RatersError(f"--max-clusters must be at least 2, got {max_clusters}")
    r = load_ratings(labeled, "--labeled", min_images, exclude)
    t = load_ratings(test, "--test", need_raters=False) if test is not None else None
    known = true_groups(groups) if groups else None
    bb = backbone_from(model, backbone, pretrained, image_size)
    try:
        X, r, skipped = features(r, labeled, "--labeled", bb, accelerator, cache_dir, workers, batch_size)
        Xt, t, _ = features(t, test, "--test", bb, accelerator, cache_dir, workers, batch_size) if t else (None, None, 0)
    finally:
        if bb.tmpdir is not None:
            bb.tmpdir.cleanup()
    res = analyse(X, r, Xt, t, clusters, cluster_on, max_clusters, min_shared, known, seed, bb.description)
    res["summary"]["unreadable"] = skipped
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(out, res["rows"], res["pairs"], res["summary"], res["fitted"], r.raters, res["clusters"],
                  res["matrix"])
    return RatersResult(out, len(r.raters), len(r.paths), len(r.score), res["clusters"]["k"], res["summary"],
                        round(time.time() - t0, 1))


def analyse(X: np.ndarray, r: Ratings, Xt: np.ndarray | None, t: Ratings | None, clusters: int | None = None,
            cluster_on: str = "heads", max_clusters: int = 8, min_shared: int = 10, known: dict | None = None,
            seed: int = 0, features_from: str = "") -> dict:
    """Everything after the features (any features: a backbone's, or the synthetic truth's
    attributes for a ceiling): heads, agreement, clusters, the ensemble, the evaluation."""
    Z, mean, std = standardise(X)
    pooled = fit_head(Z[r.image], r.score)
    heads, rows = rater_table(Z, r, pooled, seed)
    pairs = agreement(r, min_shared)
    matrix = agreement_matrix(pairs, r.raters)
    preds = np.stack([heads[name].predict(Z) for name in r.raters])
    dist = head_distances(preds) if cluster_on == "heads" else agreement_distances(matrix, r.raters, min_shared)
    cl = cluster(dist, clusters, max_clusters)
    fitted = fit_all(Z, r, cl, mean, std, heads, pooled)
    for row, lab in zip(rows, cl["labels"]):
        row["cluster"] = int(lab)
        if known is not None:
            row["true_group"] = known.get(row["rater"])
    summary = _summary(r, features_from, cl, fitted, cluster_on, known, rows)
    if t is not None:
        summary["evaluation"] = evaluate(fitted, (Xt - mean) / std, t, seed)
    return {"rows": rows, "pairs": pairs, "summary": summary, "fitted": fitted, "clusters": cl, "matrix": matrix}


def _summary(r: Ratings, backbone: str, cl: dict, fitted: Fitted, cluster_on: str, known, rows) -> dict:
    members = {c: [name for name, lab in zip(r.raters, cl["labels"]) if lab == c] for c in range(cl["k"])}
    s = {"backbone": backbone, "raters": len(r.raters), "images": len(r.paths), "ratings": int(len(r.score)),
         "cluster_on": cluster_on, "clusters": cl["k"], "chosen_by": cl["chosen_by"],
         "silhouette": {str(k): round(v, 4) for k, v in cl["silhouette"].items()},
         "members": {str(c): m for c, m in members.items()},
         "shares": {str(c): round(float(x), 4) for c, x in enumerate(fitted.shares)},
         "rating_shares": {str(c): round(float(np.isin(r.rater, m).mean()), 4) for c, m in members.items()}}
    if known is not None:
        missing = [row["rater"] for row in rows if row["rater"] not in known]
        if missing:
            raise RatersError(f"--true-groups: no group for rater(s) {', '.join(missing[:5])}")
        s["adjusted_rand_index"] = float(adjusted_rand_score([known[row["rater"]] for row in rows], cl["labels"]))
    return s


# --------------------------------------------------------------------------- outputs


def _csv(rows: list[dict]) -> str:
    import csv
    import io

    buf = io.StringIO()
    keys = list(dict.fromkeys(k for row in rows for k in row))
    w = csv.DictWriter(buf, keys, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def _clean_json(v):
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, 4)
    if isinstance(v, dict):
        return {k: _clean_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean_json(x) for x in v]
    return v


def write_outputs(out: Path, rows, pairs, summary: dict, fitted: Fitted, raters: list[str], cl: dict, matrix) -> None:
    write_text_atomic(out / "raters.csv", _csv(rows))
    write_text_atomic(out / "agreement.csv", _csv(pairs))
    write_text_atomic(out / "raters.json", json.dumps(_clean_json({**summary, "raters_table": rows}), indent=1) + "\n")
    write_text_atomic(out / "summary.md", summary_markdown(summary, rows))
    np.savez(out / "heads.npz", mean=fitted.mean, std=fitted.std, raters=np.array(raters),
             rater_coef=np.stack([fitted.rater_heads[n].coef for n in raters]),
             rater_intercept=np.array([fitted.rater_heads[n].intercept for n in raters]),
             cluster_of_rater=fitted.labels, shares=fitted.shares,
             cluster_coef=np.stack([h.coef for h in fitted.cluster_heads]),
             cluster_intercept=np.array([h.intercept for h in fitted.cluster_heads]),
             pooled_coef=fitted.pooled.coef, pooled_intercept=np.array(fitted.pooled.intercept))
    plot_raters(out / "raters.png", cl, matrix, raters)


def _f(v, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def summary_markdown(s: dict, rows: list[dict]) -> str:
    lines = [f"# Raters: {s['raters']} raters, {s['images']} images, {s['ratings']} ratings", "",
             f"Backbone {s['backbone']}; clustered on {s['cluster_on']}: {s['clusters']} cluster(s), chosen by "
             f"{s['chosen_by']} (silhouette per k: {s['silhouette'] or '–'}).", ""]
    if "adjusted_rand_index" in s:
        lines += [f"Adjusted Rand index against the true groups: **{s['adjusted_rand_index']:.3f}**.", ""]
    lines += ["| cluster | raters | share of raters | share of ratings |", "|---|---|---|---|"]
    for c, m in s["members"].items():
        lines.append(f"| {c} | {', '.join(m)} | {s['shares'][c]:.2f} | {s['rating_shares'][c]:.2f} |")
    lines += ["", "| rater | images | mean score | CV QWK | CV MAE | cluster |" + (" true group |" if
              "adjusted_rand_index" in s else ""), "|---|---|---|---|---|---|" + ("---|" if "adjusted_rand_index" in s
                                                                               else "")]
    for r in rows:
        lines.append(f"| {r['rater']} | {r['images']} | {r['mean_score']:.2f} | {_f(r['cv_qwk'])} | {_f(r['cv_mae'])} "
                     f"| {r['cluster']} |" + (f" {r.get('true_group')} |" if "adjusted_rand_index" in s else ""))
    ev = s.get("evaluation")
    if ev:
        lines += ["", "Against the test set's consensus:", "", "| head | QWK | MAE | Spearman | FPR |",
                  "|---|---|---|---|---|"]
        for name, m in ev["consensus"].items():
            lines.append(f"| {name} | {_f(m['qwk'])} | {_f(m['mae'])} | {_f(m['spearman'])} | "
                         f"{_f(m['false_positive_rate'])} |")
        d = ev["stratified_minus_pooled"]
        lines += ["", f"Stratified − pooled QWK: {d['diff']:+.3f} (95% bootstrap CI {d['ci95'][0]:+.3f} to "
                      f"{d['ci95'][1]:+.3f}; above 0 in {d['share_above_0']:.0%} of resamples)."]
        if ev["per_rater"]:
            lines += ["", "Per rater, against their own test ratings (QWK: own head / cluster head / pooled):", "",
                      "| rater | ratings | own | cluster | pooled |", "|---|---|---|---|---|"]
            for p in ev["per_rater"]:
                lines.append(f"| {p['rater']} | {p['ratings']} | {_f(p['own']['qwk'])} | "
                             f"{_f(p['cluster_head']['qwk'])} | {_f(p['pooled']['qwk'])} |")
    return "\n".join(lines) + "\n"


def plot_raters(path: Path, cl: dict, matrix: np.ndarray, raters: list[str]) -> None:
    """Dendrogram of the clustering over the pairwise-kappa matrix in dendrogram order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(raters)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(4.0, 0.35 * n + 2), max(6.0, 0.35 * n + 3.5)),
                                   gridspec_kw={"height_ratios": [1, 2.2]})
    leaves = dendrogram(cl["tree"], labels=raters, ax=ax1, color_threshold=None, leaf_rotation=90)["ivl"]
    ax1.set_title(f"raters clustered ({cl['k']} cluster(s))", fontsize=9)
    ax1.set_yticks([])
    order = [raters.index(x) for x in leaves]
    im = ax2.imshow(np.ma.masked_invalid(matrix[np.ix_(order, order)]), vmin=0, vmax=1, cmap="viridis")
    ax2.set_xticks(range(n), leaves, rotation=90, fontsize=7)
    ax2.set_yticks(range(n), leaves, fontsize=7)
    ax2.set_title("quadratic-weighted kappa on shared images (blank: too few shared)", fontsize=9)
    fig.colorbar(im, ax=ax2, shrink=0.7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
