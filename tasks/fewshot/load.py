"""The `Task` record and `load_task`, which reads one from a folder, a built-in name or a hub dataset.

A task folder holds `train.jsonl`, `test.jsonl` (`{"text": str, "label": int | str}`), `labels.json` (ordered label
names) and optionally `task.json` (`{"name", "kind", "template": {...}, "verbalizer": [...]}`).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import parse_qsl

from corpus.io import InputError, read_json
from tasks.builtin import TEMPLATES_BY_KIND, Template, builtin_for, default_word


@dataclass
class Task:
    """An in-context classification task: examples are `{"text": str, "label": int}` (index into `labels`)."""

    name: str
    train: list[dict]
    test: list[dict]
    labels: list[str]
    template: Template = field(default_factory=Template)
    verbalizer: list[str] = field(default_factory=list)  # one word per label; default: lower-cased names
    kind: str = "generic"
    source: str = ""

    def __post_init__(self):
        if not self.verbalizer:
            self.verbalizer = [default_word(x) for x in self.labels]
        if len(self.verbalizer) != len(self.labels):
            raise InputError(
                f"task {self.name}: verbalizer has {len(self.verbalizer)} words for {len(self.labels)} labels"
            )
        if len(set(self.verbalizer)) != len(self.verbalizer):
            raise InputError(f"task {self.name}: verbalizer words are not distinct: {self.verbalizer}")


def load_task(
    path_or_name: str | os.PathLike,
    max_test: int | None = None,
    text_column: str = "text",
    label_column: str = "label",
    train_split: str = "train",
    test_split: str = "test",
    search_dirs: Sequence[str | os.PathLike] = (),
) -> Task:
    """Load a task from a folder, a built-in name, or a hub dataset.

    - a folder with train.jsonl, test.jsonl, labels.json (and optionally task.json);
    - a name (`sst2`) looked up as a folder in `search_dirs`, then in `$CBTM_TASKS_DIR` (os.pathsep-separated),
      then in `../shared/data/tasks` beside the working directory and beside this repository;
    - `hf:<dataset>[:<config>][?text=<col>&label=<col>&train=<split>&test=<split>]` loads a hub dataset with
      `datasets.load_dataset` (the query string overrides the column/split arguments).
    `max_test` keeps a seeded random subset (seed 0, file order kept) of the test set.
    """
    spec = str(path_or_name)
    if spec.startswith("hf:"):
        task = _load_hub_task(spec, text_column, label_column, train_split, test_split)
    else:
        folder = _find_task_folder(spec, search_dirs)
        task = _load_task_folder(folder)
    if max_test is not None:
        task.test = subsample(task.test, max_test)
    return task


def subsample(examples: list[dict], n: int, seed: int = 0) -> list[dict]:
    """A seeded random subset of n examples, in their original order (all of them when n ≥ len)."""
    if n >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def _task_search_dirs(extra: Sequence[str | os.PathLike]) -> list[Path]:
    dirs = [Path(d) for d in extra]
    env = os.environ.get("CBTM_TASKS_DIR")
    if env:
        dirs += [Path(d) for d in env.split(os.pathsep) if d]
    dirs.append(Path.cwd() / ".." / "shared" / "data" / "tasks")
    dirs.append(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tasks")
    return dirs


def _find_task_folder(spec: str, search_dirs: Sequence[str | os.PathLike]) -> Path:
    p = Path(spec)
    if p.is_dir():
        return p
    if p.exists():
        raise InputError(f"task {spec} is a file; a task is a folder with train.jsonl, test.jsonl, labels.json")
    if os.sep not in spec and "/" not in spec:
        for d in _task_search_dirs(search_dirs):
            if (d / spec).is_dir():
                return (d / spec).resolve()
    raise InputError(
        f"task {spec!r} not found: not a folder, and no folder of that name in the task search path "
        f"(set CBTM_TASKS_DIR, or use hf:<dataset>[:<config>] for a hub dataset)"
    )


def _load_task_folder(folder: Path) -> Task:
    for fname in ("train.jsonl", "test.jsonl", "labels.json"):
        if not (folder / fname).is_file():
            raise InputError(f"missing file: {folder / fname} (a task folder needs train.jsonl, test.jsonl, labels.json)")
    labels = read_json(folder / "labels.json")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise InputError(f"{folder / 'labels.json'}: expected a non-empty JSON list of label names")
    if len(set(labels)) != len(labels):
        raise InputError(f"{folder / 'labels.json'}: label names are not distinct")
    meta = read_json(folder / "task.json") if (folder / "task.json").is_file() else {}
    name = meta.get("name") or folder.resolve().name
    kind, template, words = builtin_for(name, labels)
    kind = meta.get("kind", kind)
    if "template" in meta:
        try:
            template = Template.from_dict(meta["template"])
        except (TypeError, ValueError) as e:
            raise InputError(f"{folder / 'task.json'}: bad template: {e}") from None
    elif "kind" in meta and meta["kind"] in TEMPLATES_BY_KIND:
        template = TEMPLATES_BY_KIND[meta["kind"]]
    words = meta.get("verbalizer", words)
    return Task(
        name=name,
        train=_read_examples(folder / "train.jsonl", labels),
        test=_read_examples(folder / "test.jsonl", labels),
        labels=list(labels),
        template=template,
        verbalizer=list(words),
        kind=kind,
        source=str(folder),
    )


def _read_examples(path: Path, labels: list[str]) -> list[dict]:
    index = {name: i for i, name in enumerate(labels)}
    out = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise InputError(f"{path}:{lineno}: expected an object with a string 'text'")
                out.append({"text": row["text"], "label": _label_index(row.get("label"), index, labels, f"{path}:{lineno}")})
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text") from None
    return out


def _label_index(label, index: dict[str, int], labels: list[str], where: str) -> int:
    if isinstance(label, bool) or label is None:
        raise InputError(f"{where}: label {label!r} is not an index or name in labels.json")
    if isinstance(label, int):
        if 0 <= label < len(labels):
            return label
        raise InputError(f"{where}: label {label} outside labels.json (0..{len(labels) - 1})")
    if isinstance(label, str) and label in index:
        return index[label]
    raise InputError(f"{where}: label {label!r} is not in labels.json {labels}")


def _load_hub_task(spec: str, text_column: str, label_column: str, train_split: str, test_split: str) -> Task:
    """`hf:name[:config][?text=..&label=..&train=..&test=..]` through `datasets.load_dataset`."""
    body, _, query = spec[3:].partition("?")
    opts = dict(parse_qsl(query))
    text_column = opts.get("text", text_column)
    label_column = opts.get("label", label_column)
    train_split = opts.get("train", train_split)
    test_split = opts.get("test", test_split)
    name, _, config = body.partition(":")
    if not name:
        raise InputError(f"bad hub task spec {spec!r}: expected hf:<dataset>[:<config>]")
    import datasets  # only hub tasks need it, and it is slow to import

    try:
        ds = datasets.load_dataset(name, config or None)
    except Exception as e:  # network, unknown dataset, unknown config: one line for the user
        raise InputError(f"cannot load hub dataset {name!r} (config {config or None!r}): {type(e).__name__}: {e}".splitlines()[0]) from None
    for split in (train_split, test_split):
        if split not in ds:
            raise InputError(f"hub dataset {name!r} has no split {split!r} (has {list(ds)})")
        for col in (text_column, label_column):
            if col not in ds[split].column_names:
                raise InputError(f"hub dataset {name!r} split {split!r} has no column {col!r} (has {ds[split].column_names})")
    feature = ds[train_split].features[label_column]
    if hasattr(feature, "names"):  # ClassLabel: integer labels with names
        labels = list(feature.names)
    else:
        labels = sorted({str(x) for s in (train_split, test_split) for x in ds[s][label_column]})

    def rows(split):
        index = {n: i for i, n in enumerate(labels)}
        out = []
        for i, (t, y) in enumerate(zip(ds[split][text_column], ds[split][label_column])):
            y = y if hasattr(feature, "names") else str(y)
            out.append({"text": str(t), "label": _label_index(y, index, labels, f"{name}[{split}][{i}]")})
        return out

    short = name.split("/")[-1] if not config else config
    kind, template, words = builtin_for(short, labels)
    return Task(short, rows(train_split), rows(test_split), labels, template, words, kind, source=spec)
