"""Selection as Ray tasks over shards: the same selection as the driver path, index for index."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import unit_blobs
from ray_pipeline.io.pool import check_vectors
from ray_pipeline.io.run_dir import write_parquet
from ray_pipeline.cli import main
from ray_pipeline.select.kmeans import assign, hierarchical_kmeans, kmeans, training_rows
from ray_pipeline.config import Config
from ray_pipeline.runtime.devices import Devices
from ray_pipeline.select.sharded import Sharded, cluster_groups, read_shard
from ray_pipeline.embed.stage import shard_table
from ray_pipeline.errors import InputError
from ray_pipeline.select.engine import InMemory, select_candidates
from ray_pipeline.select.strategy import Clustering, Vectors

CPU = Devices()


def same_selection(a, b) -> None:
    assert [(s.k, s.method) for s in a.per_k] == [(s.k, s.method) for s in b.per_k]
    for sa, sb in zip(a.per_k, b.per_k):
        assert (sa.assign == sb.assign).all() and (sa.center == sb.center).all() and (sa.key == sb.key).all()
        assert (sa.rank == sb.rank).all()  # index for index
        assert all((sa.budgets[m] == sb.budgets[m]).all() for m in sa.budgets)
        assert (sb.rank >= 0).sum() >= max(sb.budgets)
    assert all((a.random[s] == b.random[s]).all() for s in a.random)


def write_shards(x: np.ndarray, d, size: int, seed: int, dtype: str = "float32", rows=None) -> list[str]:
    """x's rows in shuffled shards of ``size``; the ``row`` column is ``rows`` (default: position)."""
    rows = np.arange(len(x)) if rows is None else rows
    perm = np.random.default_rng(seed).permutation(len(x))
    paths = []
    for i, lo in enumerate(range(0, len(x), size)):
        part = perm[lo:lo + size]
        path = str(d / f"shard-{i:05d}.parquet")
        write_parquet(shard_table([f"s{r}" for r in rows[part]], rows[part].tolist(), x[part], dtype, []), path)
        paths.append(path)
    return paths


def test_cluster_groups_by_hand():
    # rows 10, 10, 30, 10, 40 (total 100) in 2 groups: middles at 5, 15, 35, 55, 80 -> 0, 0, 0, 1, 1
    assert cluster_groups(np.array([10, 10, 30, 10, 40]), 2).tolist() == [0, 0, 0, 1, 1]
    assert cluster_groups(np.array([5, 0, 5]), 1).tolist() == [0, 0, 0]
    g = cluster_groups(np.random.default_rng(0).integers(0, 50, 200), 7)
    assert (np.diff(g) >= 0).all() and g.min() == 0 and g.max() == 6  # consecutive ids, every group used


def test_keys_group_of_only_empty_clusters_regression_index_error():
    """A group can hold only empty clusters (sizes 10, 0, 10 in 4 groups: cluster 1 alone in group
    2) and then no rows; its center and key lifted to pool rows indexed ``rows[-1]`` of an empty
    array and raised IndexError. They are -1, as the driver path has them."""
    from ray_pipeline.select.sharded import _keys_group

    assert cluster_groups(np.array([10, 0, 10]), 4).tolist() == [1, 2, 3]
    empty = (np.zeros(0, np.int64), np.zeros((0, 4), np.float32))
    center, key = _keys_group(1, 2, np.array([0, 0, 2]), np.zeros(3, np.float32), empty)
    assert center.tolist() == [-1] and key.tolist() == [-1]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_group_arrays_is_the_sorted_concatenation_normalised(dtype):
    """A group's pieces scattered into one float32 array in pool order: the obvious concatenate,
    sort, cast and normalise, bit for bit (an empty piece included)."""
    from ray_pipeline.select.shard_tasks import _group_arrays

    rng = np.random.default_rng(3)
    rows = rng.permutation(500)
    x = (rng.standard_normal((500, 12)) * 3).astype(dtype)
    cuts = [0, 120, 120, 333, 500]  # the second piece is empty
    pieces = [(np.sort(rows[a:b]), x[a:b][np.argsort(rows[a:b])]) for a, b in zip(cuts, cuts[1:])]
    got_rows, got_x = _group_arrays(pieces)
    order = np.argsort(np.concatenate([p[0] for p in pieces]), kind="stable")
    want = check_vectors(np.concatenate([p[1] for p in pieces])[order].astype(np.float32), "ref")
    assert got_rows.tolist() == sorted(rows.tolist())
    assert got_x.dtype == np.float32 and np.array_equal(got_x, want)


def test_subtree_of_some_rows_equals_subtree_of_their_copy():
    """``subtree(x, rows=r)`` (the shard engine's group task, no copy) is ``subtree(x[r])``."""
    from ray_pipeline.select.kmeans import subtree

    x = check_vectors(unit_blobs(3000, 16, 30, seed=4), "x")
    r = np.flatnonzero(np.random.default_rng(5).random(3000) < 0.6)
    a = subtree(x, 40, path=(0, 3), rows=r)
    b = subtree(x[r], 40, path=(0, 3))
    assert np.array_equal(a.assign, b.assign) and np.array_equal(a.sim, b.sim)
    assert np.array_equal(a.centroids, b.centroids) and len(a.assign) == len(r)


def test_training_sample_is_seeded_sorted_and_only_when_needed():
    assert training_rows(1000, 4, seed=0, max_points_per_centroid=256) is None
    r = training_rows(10_000, 4, seed=0, max_points_per_centroid=256)
    assert len(r) == 1024 and (np.diff(r) > 0).all()
    assert (r == training_rows(10_000, 4, seed=0, max_points_per_centroid=256)).all()
    assert not (r == training_rows(10_000, 4, seed=1, max_points_per_centroid=256)).all()


def test_assignment_does_not_depend_on_the_batch_a_row_is_in():
    x = unit_blobs(30_000, 48, 40, 3)
    km = kmeans(x, 64, seed=0)
    whole = assign(x, km.centroids, batch_rows=1 << 20)
    for lo, hi, batch in [(0, 30_000, 4999), (7, 911, 1 << 16), (12_345, 29_999, 333)]:
        a, s = assign(x[lo:hi], km.centroids, batch_rows=batch)
        assert (a == whole[0][lo:hi]).all() and (s == whole[1][lo:hi]).all()  # bit for bit
    assert (whole[0] == km.assign).all() and (whole[1] == km.sim).all()


def test_read_shard_gives_the_driver_engines_bits_regression_center_key_swap(tmp_path):
    """The driver engine's vectors pass through ``load_embeddings`` (normalised again, row by row);
    the shards were read raw, one ulp apart, and a two-member cluster's tied center and key swapped
    between the engines on banking77. Both now hold the same bits."""
    from ray_pipeline.io.pool import load_embeddings

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True) * np.float32(1.0000001)  # as an encoder leaves them: nearly unit
    paths = write_shards(x, tmp_path, 70, seed=1)
    (tmp_path / "manifest.json").write_text("{}")  # marks the stage complete
    driver, ids = load_embeddings(tmp_path)
    rows, xs = zip(*(read_shard(p) for p in paths))
    rows, xs = np.concatenate(rows), np.concatenate(xs)
    assert (xs[np.argsort(rows)] == driver).all()
    assert not (xs[np.argsort(rows)] == x).all()  # they were renormalised, not read raw


def test_shards_store_vectors_without_a_dictionary_and_read_back_the_same_bits(tmp_path):
    """The embedding column is written without dictionary encoding (reading a float16 shard
    through its dictionary took 5x as long), the id column still with it; the vectors read back
    bit for bit."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16)).astype(np.float16)
    path = tmp_path / "shard-00000.parquet"
    write_parquet(shard_table([f"s{i}" for i in range(500)], list(range(500)), x, "float16", []), path)
    meta = pq.ParquetFile(path).metadata.row_group(0)
    dictionary = {meta.column(i).path_in_schema: meta.column(i).has_dictionary_page for i in range(meta.num_columns)}
    assert dictionary == {"id": True, "row": True, "embedding.list.element": False}
    from ray_pipeline.select.shard_tasks import _read_raw

    rows, raw = _read_raw(str(path))
    assert raw.dtype == np.float16 and (raw.view(np.uint16) == x[rows].view(np.uint16)).all()


def test_read_shard_renumbers_drops_and_filters(tmp_path):
    x = unit_blobs(10, 4, 2, 0)
    (path,) = write_shards(x, tmp_path, 10, 0)
    row_map = np.array([3, -1, 0, 1, 2, -1, 4, 5, 6, 7])
    rows, got = read_shard(path, row_map)
    assert sorted(rows.tolist()) == list(range(8))
    back = {int(r): i for i, r in enumerate(row_map) if r >= 0}
    assert all((got[j] == x[back[int(r)]]).all() for j, r in enumerate(rows))
    rows, _ = read_shard(path, None, np.array([2, 5, 9]))
    assert sorted(rows.tolist()) == [2, 5, 9]


def test_both_engines_are_vectors_strategies(tmp_path, local_ray):
    """Both strategies have what ``strategy.Vectors`` and ``strategy.Clustering`` declare (the
    members, not their signatures: runtime protocols check names)."""
    x = unit_blobs(200, 8, 4, 0)
    cfg = Config.from_dict({"cluster": {"k": [4]}, "select": {"budgets": [20]}})
    for vectors in (InMemory(x, cfg, CPU), Sharded(write_shards(x, tmp_path, 80, seed=0), 200, cfg, CPU, groups=2)):
        assert isinstance(vectors, Vectors) and isinstance(vectors.subset(np.arange(50)), Vectors)
        assert isinstance(vectors.cluster(4), Clustering)


@pytest.mark.parametrize("groups,quantile", [(1, 0.0), (3, 0.1), (8, 0.0)])
def test_sharded_selection_equals_the_driver_path(tmp_path, local_ray, groups, quantile):
    n = 12_000
    x = unit_blobs(n, 24, 25, 5)
    cfg = Config.from_dict({"cluster": {"k": [15, 60], "max_points_per_centroid": 64},  # k-means trains on a sample
                            "select": {"budgets": [60, 600], "outlier_quantile": quantile}})
    paths = write_shards(x, tmp_path, 1700, seed=groups)
    a = select_candidates(x, cfg, rng=np.random.default_rng(0), devices=CPU)
    b = select_candidates(Sharded(paths, n, cfg, CPU, groups=groups), cfg, rng=np.random.default_rng(0))
    same_selection(a, b)


@pytest.mark.parametrize("groups,quantile", [(3, 0.0), (5, 0.1)])
def test_sharded_facility_location_equals_the_driver_path(tmp_path, local_ray, groups, quantile):
    """The facility candidates (select/facility.py) per cluster group in Ray tasks: the driver's
    ranks, index for index, although the tasks' blocks hold other clusters than the driver's."""
    n = 4000
    x = unit_blobs(n, 16, 20, 4)
    cfg = Config.from_dict({"cluster": {"k": [8, 40]}, "select": {"budgets": [40, 400], "method": ["facility"],
                                                                  "outlier_quantile": quantile}})
    paths = write_shards(x, tmp_path, 900, seed=groups)
    a = select_candidates(x, cfg, rng=np.random.default_rng(0), devices=CPU)
    b = select_candidates(Sharded(paths, n, cfg, CPU, groups=groups), cfg, rng=np.random.default_rng(0))
    same_selection(a, b)
    assert {s.method for s in a.per_k} == {"facility"}


def test_sharded_selection_equals_the_driver_path_stratified_by_label(tmp_path, local_ray):
    """The default config with a labelled pool stratifies (select.stratify: auto): the shard engine
    narrows its shards to each label's rows and gives the driver's selection, index for index."""
    n = 3000
    x = unit_blobs(n, 16, 12, 2)
    labels = np.array(["a", "b", "c", "d"], dtype=object)[np.random.default_rng(1).integers(0, 4, n)]
    cfg = Config.from_dict({"select": {"budgets": [30, 150], "method": ["kcenter", "centroid", "boundary"]}})
    paths = write_shards(x, tmp_path, 700, seed=3)
    a = select_candidates(x, cfg, rng=np.random.default_rng(0), labels=labels, devices=CPU)
    b = select_candidates(Sharded(paths, n, cfg, CPU, groups=3), cfg, rng=np.random.default_rng(0), labels=labels)
    same_selection(a, b)
    assert {s.method for s in a.per_k} == {"kcenter", "centroid", "boundary"}  # the probe ran over the shards
    chosen = a.per_k[0].members(30)
    assert len(set(labels[chosen])) == 4  # it did stratify


@pytest.mark.parametrize("k,branching,leaf,node_rows", [(60, 8, 8, 250_000), (200, 6, 6, 250_000), (5, 8, 8, 250_000),
                                                       (200, 16, 4, 250_000), (200, 6, 6, 300), (60, 8, 8, 40),
                                                       (200, 16, 4, 100)])
def test_sharded_hierarchical_clustering_equals_the_driver_path(tmp_path, local_ray, k, branching, leaf, node_rows):
    """Multi-level k-means on the shard engine (the levels of nodes over ``node_rows`` rows from the
    driver, level by level over the shards; each smaller node's subtree in a group task) gives the
    driver's leaves and selection, index for index: with the root alone from the driver, with
    two or three levels from it (node_rows 300, 100), and down to the leaves (40: leaf nodes
    clustered from the driver too); also where the tree is a single flat k-means (k within one
    level). The driver gets the vectors as the shard
    tasks read them (normalised once more, row by row), as the driver engine does in a run: small
    leaves make two-member clusters whose members tie exactly, and a last-bit difference in the
    vectors would break the tie the other way."""
    n = 6000
    x = unit_blobs(n, 16, 30, 4)
    cfg = Config.from_dict({"cluster": {"k": [k], "algorithm": "hierarchical", "branching": branching,
                                        "leaf": leaf, "max_points_per_centroid": 32},
                            "select": {"budgets": [2 * k], "stratify": "none"}})
    paths = write_shards(x, tmp_path, 1100, seed=k)
    x = check_vectors(x.copy(), "the test's vectors")
    a = select_candidates(x, cfg, rng=np.random.default_rng(0), devices=CPU)
    b = select_candidates(Sharded(paths, n, cfg, CPU, groups=3, node_rows=node_rows), cfg,
                          rng=np.random.default_rng(0))
    same_selection(a, b)
    assert (a.per_k[0].assign == b.per_k[0].assign).all()
    km = hierarchical_kmeans(x, k, seed=cfg.seed, branching=branching, leaf=leaf, max_points_per_centroid=32)
    assert (a.per_k[0].assign == km.assign).all()  # the selection's clusters are the tree's leaves


def test_the_trees_group_tasks_give_the_keys_and_cut_the_pool_once(tmp_path, local_ray):
    """Where the tree's group tasks make every leaf, their pieces and key samples serve the
    clustering (the pool is cut once a K): the keys are those of a fresh cut's ``_keys_group``
    tasks, and each group's pieces hold exactly the rows of the clusters it is given. Where the
    driver made leaves itself (node_rows 40) the clustering cuts the pool itself."""
    import ray

    from ray_pipeline.select.sharded import _ShardedClustering

    n, k = 6000, 200
    x = unit_blobs(n, 16, 30, 4)
    cfg = Config.from_dict({"cluster": {"k": [k], "algorithm": "hierarchical", "branching": 6, "leaf": 6,
                                        "max_points_per_centroid": 32},
                            "select": {"budgets": [2 * k], "stratify": "none"}})
    paths = write_shards(x, tmp_path, 1100, seed=1)
    vectors = Sharded(paths, n, cfg, CPU, groups=3, node_rows=300)
    tree = vectors.cluster(k)
    fresh = _ShardedClustering(vectors, k, tree.assign, tree.sim)
    assert tree.keys is not None and fresh.keys is None
    for got, want in zip(tree.center_and_key(), fresh.center_and_key()):
        assert (got == want).all() and (got >= 0).sum() > k // 2
    assert tree.bounds[0] == 0 and len(tree.live) == 3
    for g in tree.live:
        lo, hi = tree._span(g)
        rows = np.sort(np.concatenate([ray.get(pc[g])[0] for pc in tree.pieces]))
        assert (rows == np.flatnonzero((tree.assign >= lo) & (tree.assign < hi))).all()
    assert Sharded(paths, n, cfg, CPU, groups=3, node_rows=40).cluster(k).keys is None


def test_sharded_selection_reports_shards_that_miss_rows(tmp_path, local_ray):
    x = unit_blobs(500, 8, 3, 0)
    paths = write_shards(x, tmp_path, 100, 0)
    cfg = Config.from_dict({"cluster": {"k": [3]}, "select": {"budgets": [10]}})
    with pytest.raises(InputError, match="do not cover"):
        select_candidates(Sharded(paths[:-1], 500, cfg, CPU), cfg, rng=np.random.default_rng(0))


def test_select_engine_ray_in_a_run_gives_the_driver_runs_bytes(tmp_path, shared_data, local_ray):
    """Default selection settings on a labelled pool (so stratified by label): the engines agree."""
    base = (f"data:\n  path: {shared_data / 'banking77' / 'train.csv'}\n  label_column: category\n  limit: 400\n"
            f"embed:\n  engine: local\n  shard_size: 64\n  threads_per_actor: 1\n"
            f"select:\n  budgets: [16, 40]\n")
    (tmp_path / "driver.yaml").write_text(base)
    assert main(["run", str(tmp_path / "driver.yaml"), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    (tmp_path / "ray.yaml").write_text(base + "  engine: ray\n  groups: 3\n")
    assert main(["run", str(tmp_path / "ray.yaml"), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    for name in ("selection.parquet", "clusters.parquet"):
        assert pq.read_table(tmp_path / "a" / name).equals(pq.read_table(tmp_path / "b" / name))
    assert json.loads((tmp_path / "b" / "run.json").read_text())["config"]["select"]["engine"] == "ray"

    # vectors given as .npy cannot go to the shard engine: a clear error, exit 2
    np.save(tmp_path / "x.npy", unit_blobs(400, 8, 3, 0))
    assert main(["select", "--embeddings", str(tmp_path / "x.npy"), "--k", "4", "--budgets", "10",
                 "--set", "select.engine=ray", "--out", str(tmp_path / "c"), "--no-progress"]) == 2
