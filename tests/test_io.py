import os
import stat

import pytest

from flatlab.io import atomic_path, atomic_write_text


def test_atomic_write_replaces_and_uses_normal_mode(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temp files left


def test_failed_write_keeps_previous_version(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_run_cli_prints_one_line_even_for_multiline_messages(capsys):
    from flatlab.errors import FlatlabError, run_cli

    def main(argv):
        raise FlatlabError("bad value 'a\nb'")

    assert run_cli(main, [], prog="flatlab.x") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flatlab.x: error: bad value 'a\\nb'")
