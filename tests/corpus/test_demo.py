"""The demo corpus: text of the running Python installation, deterministic, each source in one split only."""
from __future__ import annotations

import gzip
import json

import pytest

from corpus import demo
from corpus.io import InputError


def fake_sources():
    words = {"code": "def f(x):\n    return x + {i}\n", "docstrings": "mod.f{i}\nReturn x plus {i}, as documented.\n",
             "reference": "The statement {i} binds a name.\n", "licences": "Permission is granted, clause {i}.\n"}
    return {d: [(f"{d}/{s:03d}", "\n\n".join(w.format(i=s * 100 + j) * 8 for j in range(12))) for s in range(40)]
            for d, w in words.items()}


def read(folder, split):
    with gzip.open(folder / f"{split}.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f]


def test_same_installation_same_bytes(tmp_path):
    a, b = demo.write_demo_corpus(tmp_path / "a", sources=fake_sources), demo.write_demo_corpus(tmp_path / "b", sources=fake_sources)
    for split in demo.SPLITS:
        assert (a / f"{split}.jsonl.gz").read_bytes() == (b / f"{split}.jsonl.gz").read_bytes()
    other = demo.write_demo_corpus(tmp_path / "c", seed=1, sources=fake_sources)
    assert read(other, "test") != read(a, "test")


def test_every_source_lands_in_one_split(tmp_path):
    out = demo.write_demo_corpus(tmp_path / "d", sources=fake_sources)
    owner = {}
    for split in demo.SPLITS:
        docs = read(out, split)
        assert {d["source"] for d in docs} == set(demo.DOMAINS)
        for d in docs:
            assert owner.setdefault(d["origin"].split("#")[0], split) == split
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generator"] == demo.GENERATOR and set(manifest["documents"]) == set(demo.DOMAINS)


def test_a_domain_without_text_is_one_line(tmp_path):
    def no_licences():
        return {**fake_sources(), "licences": []}

    with pytest.raises(InputError, match="licences") as e:
        demo.write_demo_corpus(tmp_path / "e", sources=no_licences)
    assert "\n" not in str(e.value) and not (tmp_path / "e").exists()


def test_chunks_are_cut_at_blank_lines_near_the_size():
    text = "\n\n".join(f"paragraph {i} " + "word " * 40 for i in range(50))
    pieces = list(demo.chunk_text(text, size=600))
    assert "".join(p.replace("\n\n", "") for p in pieces) == text.replace("\n\n", "")
    assert all(len(p) <= 2 * 600 for p in pieces) and all(len(p) >= 600 for p in pieces[:-1])


def test_this_installation_has_every_domain():
    sources = demo.domain_sources()
    assert all(sources[d] for d in demo.DOMAINS)
    assert all(name == sorted(n for n, _ in sources[d])[i] for d in demo.DOMAINS for i, (name, _) in enumerate(sources[d]))
