"""Cluster stage: neurons grouped by what they write to the vocabulary, placed on a map by their `out` directions.

k-means groups neurons by their **term profiles** (``--cluster-on terms``, the default):
TF-IDF of each neuron's top-20 decoded `out` terms, reduced to 128 dimensions by SVD, so
two neurons are close when they promote the same words. Measured on the default atlas
(``python -m atlas.bench.concepts``, README): members of a cluster share far more of their
top `out` terms than when k-means grouped the `out` directions themselves
(``--cluster-on out``), which the rest of this docstring describes and which cohesion,
layout and neighbours still use.

Why `out`: every layer writes its neurons' `out` columns into the one residual stream, in
the same basis, so the cosine of two `out` directions means the same thing whichever
layers the neurons sit in; it is also the direction the decode stage reads through the
unembedding, so a cluster's decoded tokens describe what its members write. (`in` and
`gate` rows read the residual through each layer's own norm gain, a per-layer rescaling.)

Steps, each bounded by O(neurons x d_model) memory, never neurons x neurons:

1. unit `out` vectors of every neuron, layers stacked: ``X [n, d_model]``;
2. scikit-learn ``KMeans`` on ``X`` (k about 2 sqrt(n)), clusters renumbered by size;
3. layout: t-SNE (cosine) of the cluster centroids, then each neuron placed around its
   centroid by its cluster's top two principal components, inside a disc that does not
   reach the next cluster;
4. each neuron's nearest neighbours by cosine: exact, chunked, up to ``EXACT_MAX`` neurons;
   above that an inverted-file search over the neuron's own cluster and the clusters
   nearest to it (recall against exact search is measured on a sample and recorded);
5. cluster labels: the tokens most over-represented among the members' top `out` tokens
   (and their max-activating exemplar tokens, where a corpus pass has stored them).

Every random step has a fixed seed, and t-SNE runs on one thread, so the same inputs give
the same clusters and coordinates.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from atlas import faults
from atlas.config import DEFAULT_PROBE, EXACT_MAX, ClusterConfig
from atlas.errors import AtlasError
from atlas.stages.contract import Context, digest, insert_arrow, update_from_arrow

STAGE = "cluster"
FIT_MAX = 65_536            # neurons on which k-means fits its centroids (all of them up to this)
LABEL_RANKS = 10            # top `out` tokens per neuron that vote for its cluster's label
LABEL_TOKENS = 3            # tokens in a cluster label
MIN_LIFT = 3.0              # how much more common in a cluster than overall a label token must be
_EDGE_SPACE = r"^[\s\x{00a0}\x{3000}]+|[\s\x{00a0}\x{3000}]+$"    # RE2's \s is ASCII only
PROFILE_RANKS = 20          # top `out` tokens per neuron in its term profile
PROFILE_DIMS = 128          # SVD dimensions of the term profiles
RECALL_SAMPLE = 256         # queries checked against exact search when the search is approximate


# -- the geometry ----------------------------------------------------------------------
@dataclass
class Geometry:
    layer: np.ndarray           # [n] int16
    neuron: np.ndarray          # [n] int32
    cluster: np.ndarray         # [n] int32, 0 the largest cluster
    xy: np.ndarray              # [n, 2] float32
    centre_xy: np.ndarray       # [k, 2] float32
    size: np.ndarray            # [k] int64
    cohesion: np.ndarray        # [k] mean pairwise cosine inside each cluster (nan for singletons)
    nb_index: np.ndarray        # [n, neighbours] int64, rows of X
    nb_cosine: np.ndarray       # [n, neighbours] float32
    stats: dict


def unit_directions(layers: Iterable[torch.Tensor], n_rows: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.device]:
    """Stack per-layer directions ([d_mlp, d_model] each) as unit rows: X [n, d_model] float32.

    With ``n_rows`` (the total, when known) rows are written straight into one array, so
    peak memory is X itself, not X twice. Also returns the device the directions live on,
    where the neighbour search then runs.
    """
    X, parts, layer_ids, neuron_ids, device, row = None, [], [], [], torch.device("cpu"), 0
    for layer, V in enumerate(layers):
        device = V.device
        V = V.detach().float()
        V = (V / V.norm(dim=1, keepdim=True).clamp_min(1e-12)).cpu().numpy()   # a zero column stays zero
        if n_rows is not None:
            if X is None:
                X = np.empty((n_rows, V.shape[1]), np.float32)
            if row + len(V) > n_rows:
                raise AtlasError(f"the model has more than the {n_rows:,} neurons the store holds; rerun `atlas decode`")
            X[row:row + len(V)] = V
        else:
            parts.append(V)
        row += len(V)
        layer_ids.append(np.full(len(V), layer, np.int16))
        neuron_ids.append(np.arange(len(V), dtype=np.int32))
    if n_rows is None:
        X = np.ascontiguousarray(np.concatenate(parts))
    elif row != n_rows:
        raise AtlasError(f"the model has {row:,} neurons but the store holds {n_rows:,}; rerun `atlas decode`")
    return X, np.concatenate(layer_ids), np.concatenate(neuron_ids), device


def auto_k(n: int) -> int:
    """About 2 sqrt(n) clusters: ~100 members each for 46,080 neurons, a page a reader can scan."""
    return int(min(1024, max(2, round(2 * math.sqrt(n))), n))


def kmeans(X: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster ids 0..k'-1 (k' <= k, empty clusters dropped), numbered by size, largest first.

    Lloyd's k-means from k random rows (measured on SmolLM2's `out` directions: as tight
    clusters as k-means++ seeding, which alone took longer than the whole fit). Above
    ``FIT_MAX`` neurons the centroids are fitted on a fixed random sample and every neuron
    is then assigned to its nearest one. OpenMP is held to two threads: the per-thread
    partial sums then add up in the same order on every machine, so the clusters repeat.
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(seed)
    fit = X if len(X) <= FIT_MAX else X[np.sort(rng.choice(len(X), FIT_MAX, replace=False))]
    with threadpool_limits(2, user_api="openmp"):
        km = KMeans(k, init="random", n_init=1, max_iter=30, tol=1e-4, random_state=seed).fit(fit)
        raw = km.labels_ if fit is X else km.predict(X)
    size = np.bincount(raw, minlength=k)
    first = np.full(k, len(X))
    np.minimum.at(first, raw, np.arange(len(X)))
    order = [c for c in np.lexsort((first, -size)) if size[c] > 0]     # by size, then first member
    new_id = np.empty(k, np.int32)
    new_id[order] = np.arange(len(order), dtype=np.int32)
    return new_id[raw]


def cluster_sums(X: torch.Tensor, cluster: torch.Tensor, k: int, chunk: int = 1 << 16) -> torch.Tensor:
    """Sum of the unit vectors in each cluster: [k, d_model], in float64, a chunk of rows at a time."""
    sums = torch.zeros(k, X.shape[1], dtype=torch.float64)
    for lo in range(0, len(X), chunk):
        sums.index_add_(0, cluster[lo:lo + chunk], X[lo:lo + chunk].double())
    return sums


def cosine_summary(X: torch.Tensor, cluster: torch.Tensor, sums: torch.Tensor) -> tuple[np.ndarray, dict]:
    """Mean pairwise cosine within each cluster and, over all pairs, within vs across clusters.

    For unit vectors the sum of pairwise cosines of a set is ``|sum|^2 - sum |x|^2``, so these
    exact means cost O(n x d_model), not O(n^2).
    """
    k = len(sums)
    size = torch.bincount(cluster, minlength=k).double()
    self_dot = torch.zeros(k, dtype=torch.float64).index_add_(0, cluster, X.pow(2).sum(1).double())  # 1, or 0
    inside = sums.pow(2).sum(1) - self_dot                                   # [k] sum over ordered pairs
    pairs = size * (size - 1)
    cohesion = torch.where(pairs > 0, inside / pairs.clamp_min(1), torch.full_like(pairs, float("nan")))
    total = sums.sum(0).pow(2).sum() - self_dot.sum()
    n = size.sum()
    across_pairs = n * n - size.pow(2).sum()
    stats = {"within_cosine": float(inside.sum() / pairs.sum()) if pairs.sum() > 0 else None,
             "across_cosine": float((total - inside.sum()) / across_pairs) if across_pairs > 0 else None}
    return cohesion.numpy(), stats


def centroid_layout(centres: np.ndarray, seed: int) -> np.ndarray:
    """2D positions of the unit cluster centroids [k, d_model], median nearest distance 1."""
    k = len(centres)
    if k >= 5:
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits

        # Barnes-Hut t-SNE sums forces over threads in no fixed order; one thread makes the
        # layout repeatable, and on at most 1,024 points it takes a few seconds.
        with threadpool_limits(1):
            xy = TSNE(2, perplexity=min(30.0, (k - 1) / 3), metric="cosine", init="pca",
                      random_state=seed).fit_transform(centres.astype(np.float64))
    else:
        centred = centres - centres.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = np.zeros((k, 2))
        xy[:, :min(2, len(vt))] = centred @ vt[:2].T
    xy = xy - xy.mean(0)
    nearest = _nearest_distance(xy)
    scale = float(np.median(nearest)) if k > 1 and np.median(nearest) > 0 else 1.0
    return xy / scale


def _nearest_distance(xy: np.ndarray) -> np.ndarray:
    if len(xy) < 2:
        return np.ones(len(xy))
    d = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1))          # [k, k], k <= 1,024
    np.fill_diagonal(d, np.inf)
    return d.min(1)


def member_layout(X: np.ndarray, cluster: np.ndarray, centre_xy: np.ndarray, seed: int) -> np.ndarray:
    """Each neuron at its centroid plus its offset along the cluster's top two principal components.

    Each neuron keeps the direction of its offset; its distance from the centre becomes
    sqrt(rank of its distance / members), so a cluster fills a disc evenly (the outermost
    neurons at the rim, the most typical in the middle). The disc's area grows with the
    cluster's size, and its radius stays under half the distance to the nearest other
    centroid, so clusters never overlap.
    """
    from sklearn.utils.extmath import randomized_svd

    xy = centre_xy[cluster].astype(np.float64)
    size = np.bincount(cluster, minlength=len(centre_xy))
    typical = max(1.0, float(np.median(size)))
    radius = np.minimum(0.5 * np.minimum(_nearest_distance(centre_xy), 2.0), 0.5 * np.sqrt(size / typical))
    order = np.argsort(cluster, kind="stable")
    bounds = np.searchsorted(cluster[order], np.arange(len(centre_xy) + 1))
    for c in range(len(centre_xy)):
        members = order[bounds[c]:bounds[c + 1]]
        if len(members) < 2:
            continue
        Y = X[members].astype(np.float64)
        Y -= Y.mean(0)
        u, s, _ = randomized_svd(Y, 2, n_iter=4, random_state=seed)
        pc = np.zeros((len(members), 2))
        pc[:, :u.shape[1]] = u * s                                           # [members, 2]
        r = np.sqrt((pc ** 2).sum(1))
        rank = np.empty(len(r))
        rank[np.argsort(r, kind="stable")] = np.arange(len(r))
        spread = np.sqrt((rank + 0.5) / len(r)) / np.where(r > 0, r, 1)
        xy[members] += pc * (spread * radius[c])[:, None]
    return xy.astype(np.float32)


def neighbours(X: torch.Tensor, k: int, cluster: torch.Tensor, centres: torch.Tensor, probe: int,
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Top-``k`` other neurons by cosine for every row of unit ``X``: (index, cosine), each [n, k], on the CPU.

    ``probe == 0`` searches every neuron (chunked matmul + topk, on X's device); otherwise
    each cluster's members are compared with the members of the ``probe`` clusters whose
    centroids are nearest its own (an inverted-file search: far fewer products, approximate;
    its recall against exact search is measured on a sample).
    """
    n, dev = len(X), X.device
    k = min(k, n - 1)
    index = torch.full((n, max(k, 0)), -1, dtype=torch.int64)
    cosine = torch.full((n, max(k, 0)), -math.inf, dtype=torch.float32)
    if k <= 0:
        return index, cosine, {"search": "none"}
    if probe == 0:
        budget = (1 << 30) if dev.type == "cuda" else (64 << 20)             # bytes of scores per chunk
        chunk = max(1, budget // (4 * n))
        for lo in tqdm(range(0, n, chunk), desc="neighbours", unit="chunk", disable=not progress):
            hi = min(lo + chunk, n)
            scores = X[lo:hi] @ X.T                                          # [chunk, n]
            scores[torch.arange(hi - lo, device=dev), torch.arange(lo, hi, device=dev)] = -math.inf
            top = scores.topk(k, dim=1)
            cosine[lo:hi], index[lo:hi] = top.values.cpu(), top.indices.cpu()
        return index, cosine, {"search": "exact"}

    n_clusters = len(centres)
    probe = min(probe, n_clusters)
    near = (centres @ centres.T).topk(probe, dim=1).indices.cpu()            # [clusters, probe]
    cluster = cluster.cpu()
    order = torch.argsort(cluster, stable=True)
    bounds = torch.searchsorted(cluster[order], torch.arange(n_clusters + 1)).tolist()
    members = [order[bounds[c]:bounds[c + 1]] for c in range(n_clusters)]
    for c in tqdm(range(n_clusters), desc="neighbours", unit="cluster", disable=not progress):
        queries = members[c]
        if len(queries) == 0:
            continue
        probed = [c] + [o for o in near[c].tolist() if o != c][:probe - 1]
        cand = torch.cat([members[o] for o in probed])                      # own cluster's members first
        scores = X[queries.to(dev)] @ X[cand.to(dev)].T                       # [members, candidates]
        diag = torch.arange(len(queries), device=dev)
        scores[diag, diag] = -math.inf
        kk = min(k, len(cand) - 1)
        top = scores.topk(kk, dim=1)
        cosine[queries, :kk], index[queries, :kk] = top.values.cpu(), cand[top.indices.cpu()]
    sample = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:RECALL_SAMPLE]
    scores = X[sample.to(dev)] @ X.T
    scores[torch.arange(len(sample), device=dev), sample.to(dev)] = -math.inf
    exact = scores.topk(k, dim=1).indices.cpu()
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(exact, index[sample]))
    return index, cosine, {"search": "inverted file", "probe": probe,
                           "recall_at_k": round(hits / (k * len(sample)), 4), "recall_sample": len(sample)}


def term_profiles(con, n_rows: int, seed: int) -> np.ndarray:
    """[n, <= PROFILE_DIMS] unit rows, (layer, neuron) order: what each neuron writes to the vocabulary.

    Each neuron's top ``PROFILE_RANKS`` decoded `out` tokens as search terms (casing and
    spacing variants one term), weighted by TF-IDF (a term half the model writes counts
    little), rows L2-normalised, then reduced by truncated SVD. Cosine in this space is
    high when two neurons promote the same words, which is what a reader of a cluster sees.
    """
    from scipy.sparse import csr_matrix
    from sklearn.decomposition import TruncatedSVD

    from atlas.site.index_format import normalise

    rows = con.execute(f"""
        SELECT row_number() OVER (ORDER BY layer, neuron) - 1 AS row, list(token) FROM (
            SELECT n.layer, n.neuron, d.token FROM neurons n LEFT JOIN decoded_tokens d
            ON d.layer = n.layer AND d.neuron = n.neuron AND d.side = 'out' AND d.polarity = 'top'
               AND d.rank < {PROFILE_RANKS})
        GROUP BY layer, neuron ORDER BY layer, neuron""").fetchall()
    if len(rows) != n_rows:
        raise AtlasError(f"the store holds {len(rows):,} neurons but {n_rows:,} directions; rerun `atlas decode`")
    vocab: dict[str, int] = {}
    indptr, indices = [0], []
    for _, tokens in rows:
        terms = sorted({normalise(t) for t in tokens if t is not None} - {""})
        indices.extend(vocab.setdefault(t, len(vocab)) for t in terms)
        indptr.append(len(indices))
    M = csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(n_rows, max(1, len(vocab))))
    df = np.bincount(M.indices, minlength=M.shape[1])
    M = M.multiply(np.log((1 + n_rows) / (1 + df)) + 1).tocsr()                    # TF-IDF, binary TF
    norms = np.sqrt(np.asarray(M.multiply(M).sum(1))).ravel()
    M = csr_matrix(M.multiply(1 / np.where(norms > 0, norms, 1)[:, None]))
    dims = min(PROFILE_DIMS, M.shape[1] - 1, n_rows - 1)
    if dims < 2:
        P = M.toarray().astype(np.float32)
    else:
        P = TruncatedSVD(dims, algorithm="randomized", n_iter=5, random_state=seed).fit_transform(M).astype(np.float32)
    norms = np.linalg.norm(P, axis=1, keepdims=True)
    return P / np.where(norms > 0, norms, 1)


def compute_geometry(X: np.ndarray, layer: np.ndarray, neuron: np.ndarray, cfg: ClusterConfig,
                     progress: bool = False, device: torch.device | str = "cpu",
                     fit: np.ndarray | None = None) -> Geometry:
    """Clusters, coordinates and neighbours of the unit rows of ``X`` [n, d_model].

    k-means groups the rows of ``fit`` (term profiles, ``term_profiles``) where given, of
    ``X`` otherwise; cohesion, layout and neighbours are always `out` cosines.
    The neighbour search runs on ``device``: on a GPU an exact search is fast at any size.
    """
    n = len(X)
    timings = {}
    t = time.perf_counter()
    k = min(cfg.n_clusters, n) if cfg.n_clusters else auto_k(n)
    cluster = kmeans(X if fit is None else fit, k, cfg.cluster_seed) if k > 1 else np.zeros(n, np.int32)
    timings["kmeans_s"] = time.perf_counter() - t
    Xt, ct = torch.from_numpy(X), torch.from_numpy(cluster.astype(np.int64))
    k = int(cluster.max()) + 1
    sums = cluster_sums(Xt, ct, k)
    centres = (sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()   # [k, d_model]
    cohesion, stats = cosine_summary(Xt, ct, sums)

    t = time.perf_counter()
    centre_xy = centroid_layout(centres.numpy(), cfg.cluster_seed)
    xy = member_layout(X, cluster, centre_xy, cfg.cluster_seed)
    timings["layout_s"] = time.perf_counter() - t

    t = time.perf_counter()
    device = torch.device(device)
    probe = cfg.neighbour_probe or (0 if n <= EXACT_MAX or device.type == "cuda" else DEFAULT_PROBE)
    nb_index, nb_cosine, search = neighbours(Xt.to(device), cfg.neighbours, ct.to(device), centres.to(device),
                                             probe, progress)
    timings["neighbours_s"] = time.perf_counter() - t
    stats.update(n_clusters=k, neurons=n, neighbour_search=search,
                 **{key: round(v, 3) for key, v in timings.items()})
    return Geometry(layer, neuron, cluster, xy, centre_xy.astype(np.float32),
                    np.bincount(cluster, minlength=k), cohesion, nb_index.numpy(), nb_cosine.numpy(), stats)


# -- the store -------------------------------------------------------------------------
def write_geometry(con, g: Geometry) -> None:
    """Replace cluster ids, coordinates, clusters and neighbours; call inside a transaction."""
    placed = pa.table({"layer": g.layer, "neuron": g.neuron, "cluster_id": g.cluster,
                       "x": g.xy[:, 0], "y": g.xy[:, 1]})
    clusters = pa.table({"cluster_id": np.arange(len(g.size), dtype=np.int32), "size": g.size.astype(np.int32),
                         "x": g.centre_xy[:, 0], "y": g.centre_xy[:, 1],
                         "cohesion": pa.array(g.cohesion.astype(np.float32), from_pandas=True)})
    n, k = g.nb_index.shape
    valid = (g.nb_index >= 0).ravel()
    nb = g.nb_index.ravel()[valid]
    rows = pa.table({"layer": np.repeat(g.layer, k)[valid], "neuron": np.repeat(g.neuron, k)[valid],
                     "rank": np.tile(np.arange(k, dtype=np.int16), n)[valid],
                     "nb_layer": g.layer[nb], "nb_neuron": g.neuron[nb],
                     "cosine": g.nb_cosine.ravel()[valid]})
    con.execute("UPDATE neurons SET cluster_id = NULL, x = NULL, y = NULL")
    update_from_arrow(con, "neurons", placed)
    con.execute("DELETE FROM clusters")
    insert_arrow(con, "clusters", clusters)
    con.execute("DELETE FROM neighbours")
    insert_arrow(con, "neighbours", rows, order="layer, neuron, rank")


def distinctive_sql(exemplars: bool, select: str | None = None) -> str:
    """A query of each cluster's distinctive tokens: ``cluster_id, r, key, spelling, raw, c``, ``r``
    counting from 1 in order of distinctiveness (see ``write_labels``); ``raw`` is the commonest
    token text, spaces kept, and ``c`` the members that have it. ``select`` replaces the final
    SELECT, to read the query's other parts (``ranked``, ``spelling``, and ``per_member``: each
    member's distinct keys)."""
    exemplar_pool = """
        UNION ALL
        SELECT e.layer, e.neuron, v.token FROM exemplars e
        JOIN corpus_docs d USING (doc_id) JOIN vocab v ON v.token_id = d.token_ids[e.token_pos + 1]
        WHERE e.polarity = 'max'""" if exemplars else ""
    return f"""
        WITH pool AS (
            SELECT layer, neuron, token FROM decoded_tokens
            WHERE side = 'out' AND polarity = 'top' AND rank < {LABEL_RANKS}
            {exemplar_pool}),
        votes AS (
            SELECT n.cluster_id, p.layer, p.neuron, lower(s.spelling) AS key, s.spelling, p.token
            FROM pool p JOIN neurons n USING (layer, neuron),
                 LATERAL (SELECT regexp_replace(p.token, '{_EDGE_SPACE}', '', 'g') AS spelling) s
            WHERE n.cluster_id IS NOT NULL AND s.spelling <> '' AND NOT contains(s.spelling, '\ufffd')),
        per_member AS (SELECT DISTINCT cluster_id, layer, neuron, key FROM votes),
        spelling AS (
            SELECT cluster_id, key, first(spelling ORDER BY c DESC, spelling) AS spelling,
                   first(token ORDER BY c DESC, token) AS raw FROM (
                SELECT cluster_id, key, spelling, token, count(*) AS c FROM votes GROUP BY ALL) GROUP BY ALL),
        counts AS (SELECT cluster_id, key, count(*) AS c FROM per_member GROUP BY ALL),
        overall AS (SELECT key, count(*) AS total FROM per_member GROUP BY key),
        n_all AS (SELECT count(*) AS n FROM neurons WHERE cluster_id IS NOT NULL),
        lifted AS (
            SELECT c.cluster_id, c.key, c.c, (c.c / k.size) / (o.total / n_all.n) AS lift
            FROM counts c JOIN overall o USING (key) JOIN clusters k USING (cluster_id), n_all
            WHERE c.c >= 2),
        ranked AS (
            SELECT *, row_number() OVER (PARTITION BY cluster_id ORDER BY c * ln(lift) DESC, key) AS r
            FROM lifted WHERE lift >= {MIN_LIFT})
        """ + (select or """
        SELECT r.cluster_id, r.r, r.key, s.spelling, s.raw, r.c
        FROM ranked r JOIN spelling s USING (cluster_id, key)""")


def write_labels(con, exemplars: bool) -> None:
    """Label each cluster with the tokens most over-represented among its members.

    A token votes once per member (case and surrounding whitespace folded; byte fragments
    shown as U+FFFD left out), from the member's top `out` tokens and, when ``exemplars``,
    the tokens at its max-activating exemplars. Score: count in the cluster x log(lift),
    lift = share in the cluster / share over all neurons, for tokens at least two members
    share with a lift of at least ``MIN_LIFT`` (tokens that half the model writes, common
    in small models, would otherwise name every large cluster alike). The label shows
    each token's commonest spelling.
    """
    con.execute("UPDATE clusters SET label = NULL, named_by = NULL")
    con.execute(f"""
        UPDATE clusters SET label = l.label FROM (
            SELECT cluster_id, string_agg(spelling, ' · ' ORDER BY r) AS label FROM ({distinctive_sql(exemplars)})
            WHERE r <= {LABEL_TOKENS} GROUP BY cluster_id
        ) l WHERE clusters.cluster_id = l.cluster_id""")


def _layer_directions(lm) -> Iterable[torch.Tensor]:
    for layer in range(lm.adapter.n_layers(lm.model)):
        yield lm.adapter.direction(lm.model, layer, "out")                  # [d_mlp, d_model]


def run(ctx: Context, cfg: ClusterConfig) -> dict:
    """Cluster, place and link every neuron of the model into the store; skipped when up to date.

    The model loads only if the geometry must be computed. With a geometry already stored
    under the same settings (say, before a corpus pass added exemplars), only the labels
    are redone.
    """
    return cluster_store(ctx, cfg, lambda: _layer_directions(ctx.lm))


def cluster_store(ctx: Context, cfg: ClusterConfig, directions) -> dict:
    """The stage on any source of per-layer `out` directions (``directions()`` yields [d_mlp, d_model])."""
    cfg.validate()
    ctx.require("decode", "the neurons to cluster")
    store = ctx.store
    # The geometry is written into decode's neuron rows, so it depends on decode too; the
    # labels depend on the geometry and on the exemplars, whose tokens vote.
    decode = ctx.inputs()["decode"]
    geometry = digest({"weights": ctx.weights_hash, "decode": decode, **asdict(cfg)})
    labels = ctx.fingerprint(geometry=geometry)
    status = ctx.record()
    if ctx.is_done(labels):
        return {"skipped": True}
    exemplars = store.count("exemplars") > 0
    start = time.perf_counter()
    if status.get("status") == "done" and status.get("geometry") == geometry:
        stats = status.get("stats", {})
        with store.transaction() as con:
            write_labels(con, exemplars)
            ctx.finish(labels, cfg, **_kept(status), exemplar_labels=exemplars)
            faults.point(STAGE, "labels written, not committed")
        return {"relabelled": True, "seconds": time.perf_counter() - start, **stats}
    X, layer, neuron, device = unit_directions(directions(), n_rows=store.count("neurons"))
    faults.point(STAGE, "directions read")
    start = time.perf_counter()          # loading the model is the build's cost, not this stage's
    fit = term_profiles(store.con, len(X), cfg.cluster_seed) if cfg.cluster_on == "terms" else None
    g = compute_geometry(X, layer, neuron, cfg, ctx.progress, device, fit)
    del fit
    faults.point(STAGE, "geometry computed")
    del X
    with store.transaction() as con:
        write_geometry(con, g)
        faults.point(STAGE, "geometry written, not committed")
        write_labels(con, exemplars)
        seconds = time.perf_counter() - start
        g.stats["seconds"] = round(seconds, 3)
        ctx.finish(labels, cfg, geometry=geometry, side="out", grouped_by=cfg.cluster_on, seconds=seconds, exemplar_labels=exemplars,
                   stats=g.stats)
    faults.point(STAGE, "committed")
    return {"seconds": seconds, **g.stats}


def _kept(record: dict) -> dict:
    """What a relabelling keeps of the record of the geometry it relabels."""
    return {k: v for k, v in record.items() if k in ("geometry", "side", "grouped_by", "seconds", "stats")}
