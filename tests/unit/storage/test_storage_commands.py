"""`dinoctl storage ls|cp|cat` on file:// stores (the s3:// side is in tests/integration)."""

import pytest

from app import storage
from app.cli import main


@pytest.fixture
def tree(tmp_path):
    root = storage.to_uri(str(tmp_path / "src"))
    storage.put_bytes(storage.join(root, "a.txt"), b"alpha")
    storage.put_bytes(storage.join(root, "sub", "b.txt"), b"beta")
    return root


def test_ls_lists_one_level_or_recursively(tree, capsys):
    assert main(["storage", "ls", tree]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{5:>12}  {tree}/a.txt", f"{'DIR':>12}  {tree}/sub/"]
    assert main(["storage", "ls", "-r", tree]) == 0
    assert capsys.readouterr().out.split() == ["5", f"{tree}/a.txt", "4", f"{tree}/sub/b.txt"]


def test_cp_object_into_directory_and_tree_recursively(tree, tmp_path, capsys):
    assert main(["storage", "cp", f"{tree}/a.txt", str(tmp_path / "out") + "/"]) == 0
    assert (tmp_path / "out" / "a.txt").read_bytes() == b"alpha"
    assert main(["storage", "cp", "-r", tree, str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "sub" / "b.txt").read_bytes() == b"beta"
    assert "copied 2 objects" in capsys.readouterr().err


def test_cat_writes_object_bytes(tree, capfdbinary):
    assert main(["storage", "cat", f"{tree}/sub/b.txt"]) == 0
    assert capfdbinary.readouterr().out == b"beta"


def test_missing_object_is_one_line_error(tree, capsys):
    assert main(["storage", "cat", f"{tree}/nope"]) == 2
    err = capsys.readouterr().err
    assert err == f"dinoctl: error: {tree}/nope: no such object\n"
