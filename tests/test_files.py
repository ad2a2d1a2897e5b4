"""sdxl.files: the one atomic write (ordinary permissions, nothing left behind on failure), the user cache
folder, and `resolve_in_folder`, the rule for names that must stay inside a folder."""

from __future__ import annotations

import os
import sys

import pytest

from sdxl import files
from sdxl.errors import BadName, NameNotFound


def umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_atomic_write_gives_the_mode_open_would(tmp_path):
    target = tmp_path / "out.bin"
    files.atomic_write_bytes(target, b"new")
    with open(tmp_path / "plain.bin", "wb") as f:  # what an ordinary open() gives under this umask
        f.write(b"x")
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == (tmp_path / "plain.bin").stat().st_mode & 0o777 == umask_mode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "plain.bin"]  # no temporary file


def test_atomic_write_follows_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        files.atomic_write_bytes(tmp_path / "private.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "private.bin").stat().st_mode & 0o777 == 0o600


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.bin"
    target.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        files.atomic_write(target, half_then_fail)
    with pytest.raises(KeyboardInterrupt):  # also for an interrupt
        files.atomic_write(target, lambda f: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.bin"]


def test_user_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SDXL_CACHE_DIR", str(tmp_path / "c"))
    assert files.user_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SDXL_CACHE_DIR")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert files.user_cache_dir() == tmp_path / "xdg" / "sdxl"


def test_resolve_in_folder(tmp_path):
    root = tmp_path / "models"
    (root / "sub").mkdir(parents=True)
    (root / "a.safetensors").write_bytes(b"")
    (root / "sub" / "b.safetensors").write_bytes(b"")
    (root / "folder").mkdir()
    (tmp_path / "secret.safetensors").write_bytes(b"")
    (root / "link.safetensors").symlink_to(tmp_path / "secret.safetensors")

    find = files.resolve_in_folder
    assert find(root, "a", "model", (".safetensors",)) == (root / "a.safetensors").resolve()
    assert find(root, "sub/b.safetensors", "model") == (root / "sub" / "b.safetensors").resolve()
    assert find(root, "folder", "model") == (root / "folder").resolve()
    with pytest.raises(NameNotFound, match="model 'folder': not found"):
        find(root, "folder", "model", files_only=True)
    with pytest.raises(NameNotFound):
        find(root, "missing", "model", (".safetensors",))
    with pytest.raises(NameNotFound, match="no LoRA folder"):
        find(None, "a", "LoRA")
    for bad in ("", " ", "../secret", "sub/../../secret", "..\\secret", "/etc/passwd", "C:x", "~/x", "a\0b",
                "link", ".", "x" * 2000):
        with pytest.raises(BadName):
            find(root, bad, "model", (".safetensors",))
