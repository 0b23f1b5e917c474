"""corpus.io.publish_dir: a finished folder replaces an output without a moment where the old one is lost."""
from __future__ import annotations

import os

import pytest

from corpus.io import publish_dir, temporary_of


def _write(folder, text):
    folder.mkdir()
    (folder / "model.txt").write_text(text)


def test_publish_dir_replaces_and_leaves_no_temporary(tmp_path):
    final, work = tmp_path / "out", tmp_path / ".out.partial"
    _write(final, "old")
    _write(work, "new")
    publish_dir(work, final)
    assert (final / "model.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_publish_keeps_the_old_output(tmp_path, monkeypatch):
    """The rename of the new folder fails (a crash at that moment): the old output is still on disk, under its
    name or a `.cbtm-old-` temporary, and the new one is still in its working folder."""
    final, work = tmp_path / "out", tmp_path / ".out.partial"
    _write(final, "old")
    _write(work, "new")
    real = os.replace

    def replace(src, dst):
        if str(src) == str(work):
            raise OSError("simulated crash")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated crash"):
        publish_dir(work, final)
    kept = [p for p in tmp_path.iterdir() if p.name == "out" or temporary_of(p.name) == "out"]
    assert [(p / "model.txt").read_text() for p in kept] == ["old"]
    assert (work / "model.txt").read_text() == "new"
