"""`dinoctl data synth | import | info` end to end through the real command line."""

import json

import numpy as np

from app import cli, entry
from app.data import Dataset, decode_image

SMALL = ["--pool", "40", "--seeds", "8", "--eval-train", "16", "--eval-val", "16", "--size", "64",
         "--shard-size", "10"]


def test_synth_then_import_of_an_image_folder_tree(tmp_path, capsys):
    out = tmp_path / "synth"
    assert cli.main(["data", "synth", "--out", str(out), "--seed", "1", *SMALL]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["pool"]["num_samples"] == 40
    assert summary["splits"]["pool"]["num_skipped"] == 3

    assert cli.main(["data", "info", str(out / "pool")]) == 0
    info = capsys.readouterr().out
    assert "samples   40 (0 labelled) in 4 shards" in info and "skipped   3" in info

    # Write eval_val out as an ImageFolder tree (class folder per label name), plus junk.
    src = Dataset(str(out / "eval_val"))
    tree = tmp_path / "tree"
    expected = {}
    for i in range(len(src)):
        s = src.get(i)
        folder = tree / s.meta["label_name"]
        folder.mkdir(parents=True, exist_ok=True)
        fmt = "png" if i % 2 else "jpg"
        decode_image(s.image_bytes).save(folder / f"{s.key}.{fmt}")
        expected[f"{s.meta['label_name']}/{s.key}.{fmt}"] = s.meta["label_name"]
    (tree / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    (tree / "README.md").write_text("not an image")

    dest = tmp_path / "imported"
    assert cli.main(["data", "import", str(tree), "--out", str(dest), "--name", "evalv",
                     "--workers", "1", "--shard-size", "5"]) == 0
    assert "imported 16 images" in capsys.readouterr().out
    ds = Dataset(str(dest))
    assert ds.stats["num_shards"] == 4 and ds.stats["num_skipped"] == 2
    assert ds.classes == sorted(set(expected.values()))
    got = {r["source"]: ds.classes[r["label"]] for r in ds.rows}
    assert got == expected
    # Re-encoding kept the pictures: compare one PNG-stored sample with its source.
    row = next(r for r in ds.rows if r["source"].endswith(".png"))
    a = np.asarray(decode_image(ds.get(ds.keys.index(row["key"])).image_bytes), np.float32)
    key = row["source"].rsplit("/", 1)[-1].split(".")[0]
    b = np.asarray(decode_image(src.get(src.keys.index(key)).image_bytes), np.float32)
    assert a.shape == b.shape and np.abs(a - b).mean() < 4.0


def test_synth_runs_as_a_job_stage(tmp_path, capsys):
    assert entry.main(["synth", "--out", str(tmp_path / "s"), *SMALL]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["seeds"]["num_samples"] == 8
    assert len(Dataset(str(tmp_path / "s" / "seeds"))) == 8


def test_info_on_an_incomplete_dataset_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "half" / "shards").mkdir(parents=True)
    assert cli.main(["data", "info", str(tmp_path / "half")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a complete dataset" in err and "\n" not in err
