"""The folder lock: a second holder is refused with the first one named; a dead holder's lock is taken over."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess

import pytest

from dit_jax import locking


def write_lock(folder, **fields) -> None:
    holder = {"purpose": "training run", "host": socket.gethostname(), "pid": os.getpid(), "started": "then",
              "command": ["python", "-m", "dit_jax.main"], "token": "theirs", **fields}
    (folder / locking.LOCK_FILE).write_text(json.dumps(holder))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_second_holder_is_refused_naming_the_first_and_the_lock_goes_with_the_first(tmp_path):
    with locking.hold(str(tmp_path), purpose="training run") as lock:
        assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
        with pytest.raises(locking.LockHeldError) as err:
            locking.acquire(str(tmp_path), purpose="training run")
        message = str(err.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}, started {lock['started']}" in message
        assert "still running" in message and str(tmp_path / locking.LOCK_FILE) in message
    assert not (tmp_path / locking.LOCK_FILE).exists()
    with locking.hold(str(tmp_path), purpose="training run"):
        pass


def test_the_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    write_lock(tmp_path, pid=dead_pid())
    with caplog.at_level(logging.WARNING):
        lock = locking.acquire(str(tmp_path), purpose="training run")
    assert "taking over the lock" in caplog.text and "no longer running" in caplog.text
    assert json.loads((tmp_path / locking.LOCK_FILE).read_text())["token"] == lock["token"]


def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path):
    """The recorded pid now belongs to a process that started later (this one): the holder is gone."""
    ticks = locking._process_start_ticks(os.getpid())
    assert ticks is not None
    write_lock(tmp_path, start_ticks=ticks - 1)
    locking.acquire(str(tmp_path), purpose="training run")


def test_an_unreadable_lock_is_taken_over(tmp_path):
    (tmp_path / locking.LOCK_FILE).write_text('{"host": "ha')  # its writer was killed half-way
    locking.acquire(str(tmp_path), purpose="training run")


def test_another_hosts_lock_is_refused_unless_taken_over_explicitly(tmp_path, monkeypatch):
    write_lock(tmp_path, host="tpu-worker-7", pid=4242)
    with pytest.raises(locking.LockHeldError, match=rf"host tpu-worker-7, pid 4242, started then.*"
                                                   rf"{locking.TAKE_OVER_ENV}=1 to take the lock over"):
        locking.acquire(str(tmp_path), purpose="training run")
    monkeypatch.setenv(locking.TAKE_OVER_ENV, "1")
    with locking.hold(str(tmp_path), purpose="training run") as lock:
        # The holder it replaced is still out there: ending this block must not remove a lock taken from us.
        write_lock(tmp_path, host="tpu-worker-7", pid=4242)
    assert json.loads((tmp_path / locking.LOCK_FILE).read_text())["token"] == "theirs" != lock["token"]


def test_a_file_or_an_unwritable_folder_is_named_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    for path in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(locking.UnusableFolderError, match=f"^{path} is a file, not a folder"):
            locking.acquire(str(path), purpose="training run")
    real_open = os.open

    def read_only_disk(path, *args, **kwargs):
        if str(path).endswith(locking.LOCK_FILE):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_disk)
    with pytest.raises(locking.UnusableFolderError, match=f"^cannot write in {tmp_path}: Read-only file system"):
        with locking.hold(str(tmp_path), purpose="training run"):
            pass


def test_a_folder_the_lock_created_goes_if_the_holder_leaves_it_empty(tmp_path):
    new = tmp_path / "runs" / "x"
    with pytest.raises(ValueError, match="refused"):
        with locking.hold(str(new), purpose="training run"):
            (new / "blocks" / "inner").mkdir(parents=True)
            raise ValueError("refused at the start")
    assert not (tmp_path / "runs").exists()  # nor the parent it made
    # A folder that existed, or one the run wrote a file in, stays.
    (tmp_path / "old").mkdir()
    with locking.hold(str(tmp_path / "old"), purpose="training run"):
        pass
    with locking.hold(str(new), purpose="training run"):
        (new / "blocks").mkdir()
        (new / "settings.json").write_text("{}")
    assert (tmp_path / "old").is_dir() and sorted(os.listdir(new)) == ["blocks", "settings.json"]
