import errno
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from flatlab.errors import FlatlabError
from flatlab.io import LOCK_NAME, WriteError, atomic_path, atomic_write_text, lock_directory


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


# --------------------------------------------------------------------------- failed writes

def test_injected_disk_full_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.csv"
    atomic_write_text(target, "epoch,loss\n1,0.5\n")

    def full_disk(self, data):
        with open(self, "wb") as fh:  # half the bytes land, then the disk is full
            fh.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(WriteError) as info:
        atomic_write_text(target, "epoch,loss\n1,0.5\n2,0.4\n")
    message = str(info.value)
    assert isinstance(info.value, FlatlabError) and "\n" not in message
    assert message.startswith(f"cannot write {target}: No space left on device (errno 28, "
                              f"disk full)")
    assert target.read_text() == "epoch,loss\n1,0.5\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_safetensors_os_errors_are_write_errors(tmp_path, monkeypatch):
    import flatlab.checkpoint.files as files
    from flatlab.checkpoint import read_checkpoint, save_checkpoint

    path = tmp_path / "model.safetensors"
    model = torch.nn.Linear(3, 2)
    save_checkpoint(path, model, {"epoch": 1})

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("Error while serializing: I/O error: No space left on device "
                           "(os error 28)")  # how safetensors' SafetensorError reads

    monkeypatch.setattr(files, "save_file", full_disk)
    with pytest.raises(WriteError, match="No space left on device .errno 28, disk full"):
        save_checkpoint(path, torch.nn.Linear(3, 2), {"epoch": 2})
    assert read_checkpoint(path)[1]["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


FSIZE_CHILD = textwrap.dedent("""
    import resource, sys, torch
    from flatlab.checkpoint import save_checkpoint, save_state
    from flatlab.errors import FlatlabError
    from flatlab.io import atomic_write_text
    out = sys.argv[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # bytes per file
    big = torch.nn.Linear(100, 100)   # 40 KB of weights
    writes = [lambda: save_checkpoint(out + "/model.safetensors", big, {"epoch": 2}),
              lambda: save_state(out + "/train_state.safetensors", {"w": big.weight}),
              lambda: atomic_write_text(out + "/metrics.csv", "x" * 30_000)]
    for write in writes:
        try:
            write()
            print("written")
        except FlatlabError as err:
            print(err)
""")


def test_file_size_limit_in_a_child_process(tmp_path):
    from flatlab.checkpoint import load_state, read_checkpoint, save_checkpoint, save_state

    small = torch.nn.Linear(4, 2)
    save_checkpoint(tmp_path / "model.safetensors", small, {"epoch": 1})
    save_state(tmp_path / "train_state.safetensors", {"step": 7, "w": small.weight})
    atomic_write_text(tmp_path / "metrics.csv", "epoch\n1\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    for line, name in zip(lines, ["model.safetensors", "train_state.safetensors",
                                  "metrics.csv"], strict=True):
        assert line == (f"cannot write {tmp_path / name}: File too large (errno 27, over the "
                        f"file-size limit (ulimit -f)); nothing was replaced")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary files
    state, meta = read_checkpoint(tmp_path / "model.safetensors")
    assert meta["epoch"] == 1 and torch.equal(state["weight"], small.weight.detach())
    saved = load_state(tmp_path / "train_state.safetensors")
    assert saved["step"] == 7 and torch.equal(saved["w"], small.weight.detach())
    assert (tmp_path / "metrics.csv").read_text() == "epoch\n1\n"


def test_unwritable_directory_is_a_write_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(WriteError, match="Permission denied"):
            atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        tmp_path.chmod(0o700)


# --------------------------------------------------------------------------- directory lock

HOLDER = textwrap.dedent("""
    import sys
    from flatlab.io import lock_directory
    with lock_directory(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()   # hold until the parent closes stdin (or kills us)
    print("released", flush=True)
""")

CONTENDER = textwrap.dedent("""
    import sys
    from flatlab.errors import FlatlabError
    from flatlab.io import lock_directory
    try:
        with lock_directory(sys.argv[1]):
            print("got it")
    except FlatlabError as err:
        print(err)
""")


def _contend(directory):
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", CONTENDER, str(directory)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip(), time.monotonic() - start


def test_second_process_is_refused_at_once_and_a_killed_holder_leaves_no_lock(tmp_path):
    run = tmp_path / "runs" / "x"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        assert (run / LOCK_NAME).read_text() == f"{holder.pid}\n"
        message, seconds = _contend(run)
        assert message.startswith(f"{run.resolve()} is in use by pid {holder.pid} ")
        assert seconds < 30  # refused, not waiting for the holder
        holder.stdin.close()  # a clean release
        assert holder.stdout.readline().strip() == "released"
        holder.wait(timeout=30)
        assert _contend(run)[0] == "got it"
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "locked"
        assert _contend(run)[0].endswith(f"in use by pid {holder.pid} (one process writes a "
                                         f"directory at a time; wait for it to finish or stop it)")
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs
        holder.wait()
    assert _contend(run)[0] == "got it"  # the kernel dropped the dead holder's lock


def test_lock_nests_in_one_process_and_releases(tmp_path):
    with lock_directory(tmp_path / "d") as directory:
        assert directory == (tmp_path / "d").resolve()
        with lock_directory(directory):
            pass
        assert _contend(directory)[0].startswith(f"{directory} is in use by pid {os.getpid()}")
    assert _contend(tmp_path / "d")[0] == "got it"
    assert (tmp_path / "d" / LOCK_NAME).read_text() == ""  # the pid is cleared on release
