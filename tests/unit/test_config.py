"""Config loading: presets with `_base_` chains, `--set` coercion, one-line errors naming key and file."""

import textwrap

import pytest

from app.config import Config, ConfigError, config_hash, flatten, load_config


def preset(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def one_line_error(preset_path, overrides=None) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(preset_path, overrides)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_preset_overrides_defaults_and_keeps_the_rest(tmp_path):
    path = preset(tmp_path, "p.yaml", """
        run: {name: tiny}
        train: {batch_size_per_gpu: 8}
        curation: {dedup: {k: 16}}
    """)
    cfg = load_config(path)
    assert (cfg.run.name, cfg.train.batch_size_per_gpu, cfg.curation.dedup.k) == ("tiny", 8, 16)
    assert cfg.optim.base_lr == Config().optim.base_lr


def test_base_chain_applies_bases_first(tmp_path):
    preset(tmp_path, "root.yaml", "train: {batch_size_per_gpu: 4, max_steps: 10}\nrun: {name: root}\n")
    preset(tmp_path, "mid.yaml", "_base_: root.yaml\ntrain: {max_steps: 20}\n")
    child = preset(tmp_path, "child.yaml", "_base_: mid.yaml\nrun: {name: child}\n")
    cfg = load_config(child)
    assert (cfg.run.name, cfg.train.batch_size_per_gpu, cfg.train.max_steps) == ("child", 4, 20)


def test_base_cycle_and_missing_base_name_the_file(tmp_path):
    a = preset(tmp_path, "a.yaml", "_base_: b.yaml\n")
    preset(tmp_path, "b.yaml", "_base_: a.yaml\n")
    assert "_base_ cycle" in one_line_error(a)
    c = preset(tmp_path, "c.yaml", "_base_: nope.yaml\n")
    assert one_line_error(c) == f"{c}: _base_ 'nope.yaml' is neither a file next to it nor a preset"


def test_unknown_top_level_key_names_key_and_file(tmp_path):
    path = preset(tmp_path, "p.yaml", "trian: {max_steps: 1}\n")
    assert one_line_error(path) == f"{path}: unknown key 'trian' (did you mean 'train'?)"


def test_unknown_nested_key_names_full_key_and_file(tmp_path):
    path = preset(tmp_path, "p.yaml", "curation:\n  dedup:\n    treshold: 0.5\n")
    msg = one_line_error(path)
    assert msg == f"{path}: unknown key 'curation.dedup.treshold' (did you mean 'threshold'?)"


def test_unknown_key_in_base_names_the_base_file(tmp_path):
    base = preset(tmp_path, "base.yaml", "model: {archh: vit_small}\n")
    child = preset(tmp_path, "child.yaml", "_base_: base.yaml\n")
    assert one_line_error(child).startswith(f"{base}: unknown key 'model.archh'")


@pytest.mark.parametrize("text, key, kind", [
    ("train: {batch_size_per_gpu: many}", "train.batch_size_per_gpu", "an int"),
    ("train: {batch_size_per_gpu: true}", "train.batch_size_per_gpu", "an int"),
    ("optim: {base_lr: fast}", "optim.base_lr", "a float"),
    ("distill: {enabled: maybe}", "distill.enabled", "a bool"),
    ("ibot: {mask_ratio_min_max: [0.1, high]}", "ibot.mask_ratio_min_max[1]", "a float"),
    ("curation: {seeds: {a: 1}}", "curation.seeds", "a list"),
    ("train: 5", "train", "a mapping"),
    ("run: {name: [a, b]}", "run.name", "a string"),
])
def test_wrong_type_names_key_and_file(tmp_path, text, key, kind):
    path = preset(tmp_path, "p.yaml", text + "\n")
    msg = one_line_error(path)
    assert msg.startswith(f"{path}: '{key}' must be {kind}")


def test_missing_preset_is_one_line_error_listing_presets(tmp_path):
    msg = one_line_error("no-such-preset")
    assert msg.startswith("config preset 'no-such-preset' not found")


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = preset(tmp_path, "p.yaml", "run:\n  name: [unclosed\n")
    assert one_line_error(path).startswith(f"{path}: line ")


def test_set_coerces_int_float_bool_list_and_str(tmp_path):
    cfg = load_config(None, [
        "train.batch_size_per_gpu=32", "optim.base_lr=1e-3", "optim.weight_decay=0.5",
        "distill.enabled=true", "ibot.mask_ratio_min_max=[0.2, 0.4]", "curation.seeds=s3://a,s3://b",
        "curation.cluster.n_clusters=[10, 5]", "run.name=0123", "run.experiment=yes",
        "student.arch=vit_small",
    ])
    assert cfg.train.batch_size_per_gpu == 32 and cfg.optim.base_lr == 1e-3
    assert cfg.optim.weight_decay == 0.5 and cfg.distill.enabled is True
    assert cfg.ibot.mask_ratio_min_max == [0.2, 0.4]
    assert cfg.curation.seeds == ["s3://a", "s3://b"] and cfg.curation.cluster.n_clusters == [10, 5]
    # String fields take the text as typed (YAML would give 83 and True).
    assert cfg.run.name == "0123" and cfg.run.experiment == "yes"
    assert cfg.student is not None and cfg.student.arch == "vit_small"


def test_set_applies_after_preset(tmp_path):
    path = preset(tmp_path, "p.yaml", "train: {batch_size_per_gpu: 8}\n")
    assert load_config(path, ["train.batch_size_per_gpu=2"]).train.batch_size_per_gpu == 2


@pytest.mark.parametrize("item, expected", [
    ("train.batchsize=1", "--set train.batchsize=1: unknown key 'train.batchsize'"),
    ("train.batch_size_per_gpu=abc",
     "--set train.batch_size_per_gpu=abc: 'train.batch_size_per_gpu' must be an int, got 'abc'"),
    ("distill.enabled=2", "--set distill.enabled=2: 'distill.enabled' must be a bool"),
    ("train.batch_size_per_gpu", "--set 'train.batch_size_per_gpu': expected key=value"),
])
def test_bad_set_is_one_line_error_naming_the_override(item, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [item])
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_validation_names_the_key():
    with pytest.raises(ConfigError, match="'train.zero_stage' must be 0..3"):
        load_config(None, ["train.zero_stage=4"])
    with pytest.raises(ConfigError, match="'train.centering' must be one of"):
        load_config(None, ["train.centering=mean"])


def test_config_hash_changes_with_content_and_flatten_gives_dotted_keys():
    a, b = Config(), Config()
    assert config_hash(a) == config_hash(b)
    b.optim.base_lr *= 2
    assert config_hash(a) != config_hash(b)
    flat = flatten(a)
    assert flat["curation.dedup.k"] == 64 and flat["train.batch_size_per_gpu"] == 64


# -- where a pod's config puts things (issue #13: DINOCTL_STORE, presets in the image) ----------

def test_run_store_comes_from_dinoctl_store_and_fills_store_references(tmp_path, monkeypatch):
    stage = preset(tmp_path, "pretrain.yaml", """
        _base_: demo
        train: {dataset: "${run.store}/datasets/curated"}
        distill: {teacher: "${run.store}/runs/teacher"}
    """)
    monkeypatch.setenv("DINOCTL_STORE", "s3://bkt/store/")
    cfg = load_config(stage)
    assert cfg.run.store == "s3://bkt/store"
    assert cfg.train.dataset == "s3://bkt/store/datasets/curated"
    assert cfg.distill.teacher == "s3://bkt/store/runs/teacher"
    assert cfg.model.arch == "vit_tiny"  # the preset named by _base_ was applied
    # an explicit run.store still wins over the environment
    assert load_config(stage, ["run.store=file:///data/s"]).train.dataset == "file:///data/s/datasets/curated"


def test_dinoctl_home_moves_the_default_store_to_a_writable_place(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOCTL_HOME", str(tmp_path / "home"))
    cfg = load_config("demo")
    assert cfg.run.store == (tmp_path / "home" / "store").as_uri()
    assert cfg.train.dataset.startswith(cfg.run.store + "/")


def test_without_settings_the_store_is_the_embedded_default(monkeypatch):
    monkeypatch.delenv("DINOCTL_HOME", raising=False)  # the suite's own home (tests/conftest.py)
    assert load_config("demo").run.store == "file://./.dinoctl/store"
    assert load_config("demo").train.dataset == "file://./.dinoctl/store/datasets/synth/pool"


def test_presets_are_found_in_dinoctl_config_dir(tmp_path, monkeypatch):
    d = tmp_path / "presets"
    d.mkdir()
    preset(d, "mine.yaml", "run: {name: mine}\n")
    monkeypatch.setenv("DINOCTL_CONFIG_DIR", str(d))
    assert load_config("mine").run.name == "mine"
    msg = str(pytest.raises(ConfigError, load_config, "nope").value)
    assert "mine" in msg and "demo" in msg and str(d) in msg


def test_installed_wheel_ships_the_presets(tmp_path):
    """The image installs the package (not the source tree): presets must come with the wheel."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path), str(root)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("dinoctl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if "/share/dinoctl/configs/" in n}
    assert {p.name for p in (root / "configs").glob("*.yaml")} <= shipped
