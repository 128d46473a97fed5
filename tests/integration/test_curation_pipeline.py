"""The curation stages end to end on the synthetic collection, through the real CLI entry
points, storage (file://) and an MLflow sqlite store. Uses the weight-free thumbnail descriptor
so the planted near-duplicates are what the thresholds below separate."""

import json

import numpy as np
import pytest

from app import storage
from app.curation.artifacts import CurationRun
from app.curation.embed import load_set
from app.curation.run import main as curate_main

THRESHOLD = 0.925  # thumbnail cosine separating planted copies from distinct synth images


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from app.data.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root.as_uri(), seed=0, n_pool=160, n_seeds=24, n_eval_train=40, n_eval_val=20,
               image_size=48, n_corrupt=0, max_samples_per_shard=50)
    return root


def _args(store, synth_root, name="t", extra=()):
    s = synth_root.as_uri()
    sets = [
        f"run.store={store}", f"run.name={name}", f"curation.pool={s}/pool", f"curation.seeds={s}/seeds",
        f"curation.eval_sets={s}/eval_train,{s}/eval_val", "curation.embed.model=thumbnail",
        f"curation.dedup.threshold={THRESHOLD}", f"curation.dedup.eval_threshold={THRESHOLD}",
        "curation.dedup.k=8", "curation.retrieve.n_clusters=8", "curation.retrieve.images_per_cluster=4",
        "curation.retrieve.cluster_hits_min=1", "curation.retrieve.n_iters=5",
        "curation.cluster.n_clusters=[12,4]", "curation.cluster.n_resampling_steps=[1,1]",
        "curation.cluster.sample_size=[3,2]", "curation.cluster.n_iters=5",
        "curation.cluster.target_size=40", "curation.name=curated-" + name, *extra,
    ]
    return [x for kv in sets for x in ("--set", kv)]


@pytest.fixture(scope="module")
def curated(synth, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:  # module-scoped: the env must not leak out
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow.db")
        mp.setenv("DINOCTL_HOME", str(home))
        store = (home / "store").as_uri()
        assert curate_main(["curate", "run", "--config", "curate_lvd", *_args(store, synth)]) == 0
        yield CurationRun(store, "t"), store


def _dedup_outcome(run, synth):
    """(fraction of planted pairs joined, pool keys removed by self-dedup that are not planted
    duplicates or originals, dedup arrays, pool rows of the eval copies, number of pool keys)."""
    truth = json.loads((synth / "ground_truth.json").read_text())
    keys = load_set(run, "pool", (synth / "pool").as_uri())["keys"].tolist()
    pos = {k: i for i, k in enumerate(keys)}
    d = run.get_arrays("dedup/dedup.npz")
    comp = d["components"]
    joined = np.mean([comp[pos[a]] == comp[pos[b]] for a, b in truth["pool_duplicates"].items()])
    planted = set(truth["pool_duplicates"]) | set(truth["pool_duplicates"].values())
    wrongly_removed = {keys[i] for i in np.flatnonzero(~d["self_keep"])} - planted
    return joined, wrongly_removed, d, [pos[k] for k in truth["eval_copies"]], len(keys)


def test_dedup_removes_planted_duplicates_and_eval_copies(curated, synth):
    run, _ = curated
    joined, wrongly_removed, d, copies, _ = _dedup_outcome(run, synth)
    assert joined >= 0.8
    assert not wrongly_removed  # nothing else was merged at this threshold
    assert d["eval_drop"][copies].mean() >= 0.8
    assert not d["kept"][copies].any() or d["kept"][copies].mean() <= 0.2


def test_materialized_dataset_has_provenance(curated, synth):
    run, store = curated
    from app.data import Dataset

    ds = Dataset(storage.join(store, "datasets", "curated-t"))
    summary = run.summary("selection")
    assert len(ds) == summary["n_samples"] > 24
    from app.data import iter_samples

    metas = [s.meta for s in iter_samples(ds.uri)]
    assert len(metas) == len(ds)
    sources = {m["source_dataset"] for m in metas}
    assert sources == {(synth / "seeds").as_uri(), (synth / "pool").as_uri()}
    sample = next(s for s in iter_samples(ds.uri) if s.key.startswith("pool-"))
    assert sample.meta["source_dataset"] == (synth / "pool").as_uri()
    assert sample.meta["stages"] and sample.meta["component"] >= 0 and sample.meta["cluster"] >= 0
    kept = run.get_arrays("dedup/dedup.npz")["kept"]
    keys = load_set(run, "pool", (synth / "pool").as_uri())["keys"].tolist()
    selected_pool = [m["source_key"] for m in metas if m["source_dataset"].endswith("/pool")]
    assert all(kept[keys.index(k)] for k in selected_pool)  # no removed duplicate comes back


def test_report_has_counts_and_figures(curated, capsys):
    run, store = curated
    summary = run.summary("report")
    stages = [r["stage"] for r in summary["counts"]]
    assert {"embed:pool", "dedup:self", "dedup:relative", "cluster", "materialize"} <= set(stages)
    for fig in ("dedup_component_sizes.png", "cluster_sizes.png", "dedup_groups.png", "cluster_samples.png"):
        assert storage.get_bytes(run.uri("report", fig))[:4] == b"\x89PNG"
    # the report is one HTML page with the counts and every figure inline, also in MLflow
    page = storage.get_bytes(run.uri("report", "report.html")).decode()
    assert page.count("data:image/png;base64,") == 4 and "dedup:relative" in page
    from mlflow.tracking import MlflowClient

    home = store[len("file://"):].rsplit("/store", 1)[0]  # the fixture's sqlite store
    client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    logged = {a.path for r in runs for a in client.list_artifacts(r.info.run_id, "curation")}
    assert "curation/report.html" in logged
    from app.cli import main as cli_main

    assert cli_main(["curate", "report", "t", "--set", f"run.store={store}"]) == 0
    assert "dedup:relative" in capsys.readouterr().out


def test_rerun_is_a_no_op(curated, synth):
    run, store = curated
    before = {o.uri: o for o in storage.list_objects(run.root)}
    stamp = storage.get_bytes(run.uri("dedup", "_SUCCESS"))
    assert curate_main(["curate", "run", "--config", "curate_lvd", *_args(store, synth)]) == 0
    assert storage.get_bytes(run.uri("dedup", "_SUCCESS")) == stamp
    assert set(before) == {o.uri for o in storage.list_objects(run.root)}


def test_copy_head_dedup_at_the_paper_thresholds_with_a_vit_embedder(tmp_path, monkeypatch):
    """The default descriptor for a ViT embedder: a copy head fitted on the pool during embed.
    With it, the paper's cosine 0.6 / 0.45 separate the planted copies even for an untrained
    tiny ViT (its layout features carry enough), where its raw CLS merges almost everything.
    The head needs a pool of some hundreds of images to generalise: the default synthetic one."""
    from app.data.synth import synthesize

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("DINOCTL_HOME", str(tmp_path / "home"))
    synth = tmp_path / "synth"
    synthesize(synth.as_uri(), seed=2, n_pool=600, n_corrupt=0)
    store = (tmp_path / "store").as_uri()
    s = synth.as_uri()
    sets = [f"run.store={store}", "run.name=ch", f"curation.pool={s}/pool",
            f"curation.eval_sets={s}/eval_train,{s}/eval_val", "curation.stages=[embed,dedup]",
            "curation.embed.model=vit", "curation.embed.arch=vit_tiny", "curation.embed.weights=",
            "curation.embed.image_size=56"]
    assert curate_main(["curate", "run", "--config", "curate_lvd",
                        *[x for kv in sets for x in ("--set", kv)]]) == 0
    run = CurationRun(store, "ch")
    emb = run.summary("embeddings")
    assert emb["sets"]["pool"]["copy_dim"] == 256 and emb["copy_head"]["views"] == 13
    summary = run.summary("dedup")
    assert summary["descriptor"] == "copy" and summary["self"]["n_removed"] > 0
    joined, wrongly_removed, d, copies, n_pool = _dedup_outcome(run, synth)
    assert joined >= 0.9
    assert len(wrongly_removed) <= 0.03 * n_pool
    assert d["eval_drop"][copies].all()
    # --force re-embeds from scratch (here without a copy head), so a dedup that expects copy
    # descriptors stops with a one-line error instead of comparing the wrong vectors
    argv = [x for kv in sets for x in ("--set", kv)]
    no_head = ["--set", "curation.dedup.descriptor=embedding"]
    assert curate_main(["curate", "embed", "--force", "--config", "curate_lvd", *argv, *no_head]) == 0
    assert "copy" not in load_set(run, "pool", (synth / "pool").as_uri())
    assert not storage.exists(run.uri("embeddings", "copy_head.npz"))
    from app.config import ConfigError

    with pytest.raises(ConfigError, match="no copy-head descriptors"):
        curate_main(["curate", "dedup", "--force", "--config", "curate_lvd", *argv])
