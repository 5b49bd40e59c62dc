"""deft.io: atomic writes."""

from __future__ import annotations

import os

import pytest

from deft.io import atomic_path, write_json_atomic


def test_atomic_write_permissions_and_cleanup(tmp_path):
    mask = os.umask(0o022)
    try:
        p = write_json_atomic(tmp_path / "sub" / "a.json", {"x": 1})
        assert p.read_text() == '{\n  "x": 1\n}\n'
        assert os.stat(p).st_mode & 0o777 == 0o644  # not mkstemp's 0600
    finally:
        os.umask(mask)
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not (tmp_path / "b.txt").exists()
    assert [f.name for f in tmp_path.iterdir()] == ["sub"]  # no temporary left behind
