"""The built-in demo corpus: real text every Python installation has, no download.

Four domains (the `source` label), all read from the running interpreter's own installation:

- `code`       — Python standard-library modules (`sysconfig` "stdlib", its `test` packages left out), with
                 their docstrings taken out: code and comments only
- `docstrings` — the docstrings of those modules, classes and functions (`ast`), each after its dotted name
- `reference`  — the Python language reference that pydoc shows (`pydoc_data.topics`: one entry per topic)
- `licences`   — the licence and notice texts of the installed packages (`*.dist-info/` LICENSE, COPYING,
                 NOTICE, AUTHORS files under `sysconfig` "purelib") and the interpreter's own LICENSE.txt,
                 exact duplicates dropped

Each source (a module, a pydoc topic, a licence file) is cut into documents of about `DOC_CHARS` characters at
blank lines; a source gives at most `MAX_PER_SOURCE` documents (seeded choice; more where a domain has
fewer sources than that needs), so that no one file dominates a
domain; the sources of a domain are shuffled with the seed and dealt to test, valid and train in that order, so a
source is in one split only (no near-duplicate leaks from train to test). Files are read in sorted order, so the
corpus is deterministic for a given installation and seed; another Python version or another set of installed
packages gives another corpus (`manifest.json` records the interpreter, the sources and the counts).

`write_demo_corpus(out_dir)` writes `{train,valid,test}.jsonl.gz` with fields `id`, `text`, `source`, and
`manifest.json`. The texts keep their authors' licences (the PSF licence for the standard library; each licence
file is its own text); the corpus is written locally for the demo and never redistributed by this project.
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import json
import random
import re
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Iterator

from corpus.io import InputError, atomic_dir

DOMAINS = ("code", "docstrings", "reference", "licences")
SPLITS = {"train": 400, "valid": 40, "test": 60}  # documents per domain (fewer where a domain has fewer)
DOC_CHARS = 1200  # target document length in characters
MAX_PER_SOURCE = 6  # documents one source (file, topic) may give
GENERATOR = "stdlib-1"  # changes whenever the documents written for an installation change (enters the stage hash)

# Source = (name, text); a domain is the sorted list of its sources.
Source = tuple[str, str]


def _stdlib_modules() -> list[Path]:
    """The standard library's .py files, sorted, without site-packages, test suites and idlelib's data."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _split_module(path: Path, text: str) -> tuple[str, list[str]]:
    """(the module's code without its docstrings, its docstrings as "dotted.name\\n<docstring>")."""
    tree = ast.parse(text)
    root = Path(sysconfig.get_paths()["stdlib"])
    module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    drop: set[int] = set()  # 1-based line numbers of docstring expressions
    docs = []

    def visit(node, prefix):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            drop.update(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 40:
                docs.append(f"{prefix}\n{doc}")
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, f"{prefix}.{child.name}")

    visit(tree, module)
    code = "\n".join(line for i, line in enumerate(text.splitlines(), 1) if i not in drop)
    return code, docs


def _python_sources() -> tuple[list[Source], list[Source]]:
    code, docstrings = [], []
    for path in _stdlib_modules():
        text = _read(path)
        if not text:
            continue
        try:
            body, docs = _split_module(path, text)
        except (SyntaxError, ValueError):
            continue
        name = path.as_posix()
        code.append((name, body))
        if docs:
            docstrings.append((name, "\n\n".join(docs)))
    return code, docstrings


def _reference_sources() -> list[Source]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [(f"pydoc:{k}", topics[k]) for k in sorted(topics)]


_LICENCE_NAME = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE|AUTHORS)", re.IGNORECASE)


def _licence_sources() -> list[Source]:
    """Licence-like files of the installed distributions and of the interpreter, exact duplicates (up to
    whitespace) dropped, keeping the first in sorted path order."""
    paths = []
    for key in ("purelib", "platlib"):
        site = Path(sysconfig.get_paths()[key])
        if site.is_dir():
            paths += [p for info in site.glob("*.dist-info") for p in info.rglob("*")
                      if p.is_file() and _LICENCE_NAME.match(p.name)]
    stdlib_licence = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if stdlib_licence.is_file():
        paths.append(stdlib_licence)
    seen, out = set(), []
    for p in sorted(set(paths)):
        text = _read(p)
        if not text or len(text) < 200:
            continue
        key = hashlib.sha1(" ".join(text.split()).encode()).hexdigest()
        if key not in seen:
            seen.add(key)
            out.append((p.as_posix(), text))
    return out


def domain_sources() -> dict[str, list[Source]]:
    """Every domain's sources (name, text) from this installation, each list in sorted name order."""
    code, docstrings = _python_sources()
    return {"code": code, "docstrings": docstrings, "reference": _reference_sources(), "licences": _licence_sources()}


def chunk_text(text: str, size: int = DOC_CHARS) -> Iterator[str]:
    """Cut `text` into pieces of about `size` characters (at most 2 × size) at blank lines, or at line ends
    inside a longer paragraph; whitespace-only pieces are dropped."""
    paragraphs = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    buf: list[str] = []
    n = 0
    for para in paragraphs:
        lines = para.split("\n") if len(para) > 2 * size else [para]
        for part in lines:
            if n and n + len(part) > 2 * size:
                yield "\n\n".join(buf).strip("\n")
                buf, n = [], 0
            buf.append(part)
            n += len(part) + 2
            if n >= size:
                yield "\n\n".join(buf).strip("\n")
                buf, n = [], 0
    if buf and "".join(buf).strip():
        yield "\n\n".join(buf).strip("\n")


def _documents(domain: str, sources: list[Source], seed: int) -> dict[str, list[dict]]:
    """The documents of one domain per split: sources shuffled with the seed, dealt to test, valid, train."""
    rng = random.Random(f"{seed}-{domain}")
    order = list(range(len(sources)))
    rng.shuffle(order)
    out = {split: [] for split in SPLITS}
    fill = ["test", "valid", "train"]
    cap = max(MAX_PER_SOURCE, -(-sum(SPLITS.values()) // max(1, len(sources))))  # few long sources: more from each
    for i in order:
        name, text = sources[i]
        pieces = [p for p in chunk_text(text) if len(p.strip()) >= DOC_CHARS // 4]
        if len(pieces) > cap:
            pieces = [pieces[j] for j in sorted(rng.sample(range(len(pieces)), cap))]
        while fill and len(out[fill[0]]) >= SPLITS[fill[0]]:
            fill.pop(0)
        if not fill:
            break
        split = fill[0]
        for j, piece in enumerate(pieces[: SPLITS[split] - len(out[split])]):
            out[split].append({"id": f"{split}-{domain}-{len(out[split]):05d}", "text": piece, "source": domain,
                               "origin": f"{name}#{j}"})
    return out


def write_demo_corpus(out_dir: str | Path, seed: int = 0,
                      sources: Callable[[], dict[str, list[Source]]] = domain_sources) -> Path:
    """Write the demo corpus to `out_dir/{train,valid,test}.jsonl.gz` (fields id, text, source, origin: the file
    or topic a document comes from) and `manifest.json` (interpreter, counts per domain and split). Returns
    out_dir. InputError when a domain has no text (an installation without its standard library's sources)."""
    out_dir = Path(out_dir)
    by_domain = sources()
    empty = [d for d in DOMAINS if not by_domain.get(d)]
    if empty:
        raise InputError(f"the demo corpus found no text for {', '.join(empty)} in this Python installation "
                         f"({sys.executable}); use --corpus with your own documents")
    per_domain = {d: _documents(d, by_domain[d], seed) for d in DOMAINS}
    manifest = {"generator": GENERATOR, "python": sys.version.split()[0], "executable": sys.executable,
                "stdlib": sysconfig.get_paths()["stdlib"], "seed": seed, "doc_chars": DOC_CHARS,
                "sources": {d: len(by_domain[d]) for d in DOMAINS},
                "documents": {d: {s: len(v) for s, v in per_domain[d].items()} for d in DOMAINS}}
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            docs = [doc for d in DOMAINS for doc in per_domain[d][split]]
            random.Random(f"{seed}-{split}-order").shuffle(docs)
            lines = "".join(json.dumps(doc) + "\n" for doc in docs).encode("utf-8")
            with open(tmp / f"{split}.jsonl.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
                gz.write(lines)  # mtime 0: the same bytes for the same corpus
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return out_dir
