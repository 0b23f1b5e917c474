"""Bad input, tried as a new user would on the command line: every case fails with its exit code, one line that
names the flag or file and what is wrong (no traceback), and leaves the inputs as they were.

Exit codes (set in code, pipeline.cli.DEFAULTS, so they hold from any folder): 40 a parameter refused before any
work (luigi's `unhandled_exception`: the task could not be built), 30 a stage failed on its input
(`task_failed`), 2 an unknown or abbreviated flag, 1 an unknown task name.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.faults.harness import digest, flags, run_cli, run_subprocess
from tests.pipeline.conftest import tiny_params, write_tiny_corpus

PARAM, FAILED, FLAG, TASK = 40, 30, 2, 1


def _seed(path: Path, kind: str) -> Path:
    """A tiny seed folder: 'bloom' (a family the pipeline does not support), 'short_embeddings' (a Llama whose
    tokenizer has 300 tokens and embeddings 200 rows) or 'gpt2'."""
    from tests.experts.family_helpers import family_model, family_tokenizer, save_family

    if kind == "bloom":
        from transformers import BloomConfig, BloomForCausalLM

        BloomForCausalLM(BloomConfig(vocab_size=300, hidden_size=16, n_layer=1, n_head=2)).save_pretrained(path)
        family_tokenizer("gpt2").save_pretrained(path)
    elif kind == "short_embeddings":
        family_model("llama", vocab=200).save_pretrained(path)
        family_tokenizer("llama", 300).save_pretrained(path)
    else:
        save_family(path, kind)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _docs(n: int, field: str = "text") -> list[dict]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    return [{field: " ".join(words[(i + j) % 10] for j in range(30)), "source": f"s{i % 2}"} for i in range(n)]


# case id → (parameter overrides, or a function(tmp_path) -> overrides that writes the bad input; exit code; message)
CASES = {
    # parameters: refused before any work
    "temperature_nan": ({"temperature": "nan"}, PARAM, r"--temperature nan: must be a finite number"),
    "temperature_inf": ({"temperature": "inf"}, PARAM, r"--temperature inf: must be a finite number"),
    "temperature_negative": ({"temperature": "-1"}, PARAM, r"--temperature -1.0: must be > 0"),
    "learning_rate_nan": ({"learning_rate": "nan"}, PARAM, r"--learning-rate nan: must be a finite number"),
    "learning_rate_negative": ({"learning_rate": "-0.1"}, PARAM, r"--learning-rate -0.1: must be ≥ 0"),
    "eval_max_docs_negative": ({"eval_max_docs": "-1"}, PARAM, r"--eval-max-docs -1: must be ≥ 0"),
    "num_clusters_zero": ({"num_clusters": "0"}, PARAM, r"--num-clusters 0: must be ≥ 1"),
    "num_clusters_text": ({"num_clusters": "four"}, PARAM, r"--num-clusters 'four': expected an integer"),
    "num_clusters_fraction": ({"num_clusters": "2.5"}, PARAM, r"--num-clusters '2.5': expected an integer"),
    "train_tokens_text": ({"train_tokens": "1e6"}, PARAM, r"--train-tokens '1e6': expected an integer"),
    "top_k_above_clusters": ({"top_k": "3"}, PARAM, r"--top-k 3 is larger than --num-clusters 2"),
    "top_k_word": ({"top_k": "three"}, PARAM, r"--top-k 'three': an integer ≥ 1 or 'all'"),
    "seed_fraction_one": ({"seed_fraction": "1.0"}, PARAM, r"--seed-fraction 1.0: must be in \[0, 1\)"),
    "seed_fraction_nan": ({"seed_fraction": "nan"}, PARAM, r"--seed-fraction nan: must be a finite number"),
    "train_tokens_zero": ({"train_tokens": "0"}, PARAM, r"--train-tokens 0: must be > 0"),
    "micro_batch_zero": ({"micro_batch_size": "0"}, PARAM, r"--micro-batch-size 0: must be 'auto' or ≥ 1"),
    "batch_tokens_negative": ({"batch_tokens": "-8"}, PARAM, r"--batch-tokens -8: must be ≥ 0"),
    "vocab_too_small": ({"vocab_size": "100"}, PARAM, r"--vocab-size 100: must be ≥ 259"),
    "max_docs_two": ({"max_docs": "2"}, PARAM, r"--max-docs 2: 0 \(all\) or at least 3"),
    "seq_len_tiny": ({"seq_len": "4"}, PARAM, r"--seq-len 4: 0 \(the model's\) or at least 8"),
    "seed_negative": ({"seed": "-1"}, PARAM, r"--seed -1: must be ≥ 0"),
    "route_every_zero": ({"route_every": "0"}, PARAM, r"--route-every 0: must be ≥ 1"),
    "merge_method_unknown": ({"merge_methods": "ensemble,soup"}, PARAM, r"--merge-methods: unknown soup"),
    "clusterer_unknown": ({"clusterer": "spectral"}, PARAM, r"--clusterer 'spectral': choose one of"),
    "device_unknown": ({"device": "tpu"}, PARAM, r"--device 'tpu': choose one of"),
    "model_size_unknown": ({"model_size": "huge"}, PARAM, r"--model-size 'huge': choose one of tiny"),
    "assign_needs_balanced": ({"assign": "balanced", "clusterer": "unbalanced"}, PARAM,
                              r"--assign balanced needs --clusterer balanced"),
    "force_stage_typo": ({"force_stage": "TrainExpet"}, PARAM, r"--force-stage TrainExpet: not a stage"),
    "fewshot_models_unknown": ({"fewshot_models": "densee"}, PARAM, r"--fewshot-models names unknown models"),
    "fewshot_seeds_text": ({"fewshot_seeds": "13,x"}, PARAM, r"--fewshot-seeds '13,x': comma-separated integers"),
    "top_k_zero": ({"top_k": "0"}, PARAM, r"--top-k 0: must be ≥ 1"),
    "run_lock_wait_negative": ({"run_lock_wait": "-1"}, PARAM, r"--run-lock-wait -1.0: must be"),
    # paths: refused before any work
    "corpus_missing": (lambda t: {"corpus": str(t / "nope" / "corpus.jsonl")}, PARAM,
                       r"corpus path does not exist: .*nope/corpus.jsonl \(--corpus\)"),
    "seed_model_without_config": (lambda t: {"seed_model": str(_jsonl(t / "seed" / "weights.jsonl", []).parent)},
                                  PARAM, r"--seed-model .*seed: not a Hugging Face model folder \(no config.json\)"),
    "seed_model_missing": (lambda t: {"seed_model": str(t / "no-model")}, PARAM, r"--seed-model .*no-model: no such"),
    "seed_model_other_family": (lambda t: {"seed_model": str(_seed(t / "bloom", "bloom"))}, PARAM,
                                r"--seed-model .*bloom is a 'bloom' model, a family this pipeline does not support; "
                                r"supported families: Llama \(llama\), Mistral \(mistral\), Qwen2"),
    "seed_tokenizer_beyond_embeddings": (lambda t: {"seed_model": str(_seed(t / "short", "short_embeddings"))},
                                         PARAM, r"its tokenizer has 300 tokens but its embeddings only 200 rows"),
    "moe_for_a_family_without_one": (lambda t: {"seed_model": str(_seed(t / "gpt2", "gpt2")),
                                                "merge_methods": "average,moe"}, PARAM,
                                     r"--merge-methods moe: the seed .*gpt2 is a gpt2 model and transformers has no "
                                     r"mixture-of-experts class with GPT-2's layers"),
    "encoder_model_missing": (lambda t: {"embedder": "encoder", "encoder_model": str(t / "enc")}, PARAM,
                              r"--encoder-model .*enc: no such folder"),
    "task_folder_missing": (lambda t: {"tasks": str(t / "tasks" / "sst")}, PARAM, r"--tasks .*sst: no such task"),
    "task_name_unknown": ({"tasks": "nosuchtask"}, PARAM, r"--tasks nosuchtask: task 'nosuchtask' not found"),
    "run_dir_under_proc": ({"run_dir": "/proc/cbtm/run"}, PARAM, r"--run-dir /proc/cbtm/run: cannot create it"),
    "run_dir_is_a_file": (lambda t: {"run_dir": str(_jsonl(t / "file.txt", []))}, PARAM,
                          r"--run-dir .*file.txt is not a folder"),
    # corpus contents: PrepareCorpus, the first stage, fails
    "corpus_empty_file": (lambda t: {"corpus": str(_jsonl(t / "in" / "empty.jsonl", []))}, FAILED,
                          r"corpus .*empty.jsonl has no documents: .*empty.jsonl is empty"),
    "corpus_different_fields": (lambda t: {"corpus": str(_jsonl(t / "in" / "a.jsonl", _docs(20)).parent)}
                                if _jsonl(t / "in" / "b.jsonl", _docs(20, "content")) else None, FAILED,
                                r"corpus files have different fields: .*b.jsonl has content, source, .*a.jsonl has "
                                r"text, source; every file needs the text field 'text'"),
    "corpus_no_text_field": (lambda t: {"corpus": str(_jsonl(t / "in" / "c.jsonl", _docs(20, "body")))}, FAILED,
                             r"c.jsonl: documents have no text field 'text' \(fields: body, source\); pass --text-field"),
    "corpus_not_utf8": (lambda t: {"corpus": str(_bytes(t / "in" / "c.jsonl", b'{"text": "caf\xe9"}\n'))}, FAILED,
                        r"c.jsonl: line 1 is not valid UTF-8"),
    "corpus_bad_json": (lambda t: {"corpus": str(_bytes(t / "in" / "c.jsonl", b'{"text": "a b"}\n{"text": oops}\n'))},
                        FAILED, r"c.jsonl: line 2 is not valid JSON"),
    "corpus_two_documents": (lambda t: {"corpus": str(_jsonl(t / "in" / "c.jsonl", _docs(2)))}, FAILED,
                             r"corpus has 2 documents; need at least 3"),
    "corpus_blank_documents": (lambda t: {"corpus": str(_jsonl(t / "in" / "c.jsonl", [{"text": "  ", "source": "a"}] * 9))}, FAILED,
                               r"has no non-empty documents in field 'text'"),
    "label_field_missing": (lambda t: {"label_field": "domain"}, FAILED, r"documents have no label field 'domain'"),
    "gzip_truncated": (lambda t: {"corpus": str(_bytes(t / "in" / "c.jsonl.gz",
                                                       gzip.compress(b'{"text": "a b c"}\n' * 50)[:40]))},
                       FAILED, r"c.jsonl.gz"),
    "more_clusters_than_documents": (lambda t: {"corpus": str(write_tiny_corpus(t / "in", n_train=2, n_eval=2)),
                                                "num_clusters": "9", "top_k": "1"}, FAILED,
                                     r"--num-clusters 9 is larger than the number of training documents \(8"),
}


def _bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _record(case: str, res) -> None:
    """CBTM_FAULT_TABLE=<file>: one JSON line per case (exit code, error line), for reports."""
    if os.environ.get("CBTM_FAULT_TABLE"):
        with open(os.environ["CBTM_FAULT_TABLE"], "a") as f:
            f.write(json.dumps({"case": case, "code": res.code, "errors": res.error_lines}) + "\n")


def one_error_line(out: str, pattern: str) -> str:
    """The output's one error line, which matches `pattern`; no traceback."""
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if "InputError: " in line or line.startswith("luigi: error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), f"error lines {errors}, wanted {pattern!r}:\n{out[-3000:]}"
    return errors[0]


@pytest.fixture
def inputs(tmp_path):
    return write_tiny_corpus(tmp_path / "corpus", n_train=4, n_eval=2)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_exit_code_inputs_unchanged(case, inputs, tmp_path):
    over, code, pattern = CASES[case]
    params = tiny_params(inputs, tmp_path / "run", tasks="none")
    params.update(over(tmp_path) if callable(over) else over)
    before = digest(tmp_path)
    res = run_cli(["RunAll", "--local-scheduler", *flags(params)], tmp_path)
    _record(case, res)
    assert res.code == code, res.out[-3000:]
    one_error_line(res.out, pattern)
    after = digest(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("run/")} == before  # inputs untouched
    if code == PARAM:  # refused before any work: no run folder (or nothing in it)
        assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("argv,code,pattern", [
    (["RunAll", "--local-scheduler", "--num-cluster", "2"], FLAG, r"--num-cluster: did you mean --num-clusters\?"),
    (["RunAll", "--local-scheduler", "--temprature", "0.5"], FLAG,
     r"unrecognized arguments: --temprature 0.5 \(--temprature: did you mean --temperature\?\)"),
    (["RunAl", "--local-scheduler"], TASK, r"no task 'RunAl'; did you mean RunAll\?"),
    (["TrainExpert", "--local-scheduler", "--cluster-id", "5", "--num-clusters", "2"], PARAM,
     r"--cluster-id 5: must be in \[0, 2\)"),
    (["RunAll", "--local-scheduler", "--temperature", "nan"], PARAM, r"--temperature nan: must be a finite number"),
])
def test_command_line_mistakes_from_another_folder(argv, code, pattern, tmp_path):
    """A fresh `python -m luigi` in a folder without luigi.cfg: the same exit codes as in the repository."""
    res = run_subprocess([*argv, "--run-dir", str(tmp_path / "run")], tmp_path)
    _record(" ".join(argv[:1] + argv[2:]), res)
    assert res.code == code, res.out[-3000:]
    one_error_line(res.out, pattern)
    assert not (tmp_path / "run").exists()


def test_stage_failure_exits_non_zero_from_another_folder(tmp_path):
    """A stage that fails (here on an empty corpus file) makes `luigi` exit 30 wherever it is started."""
    corpus = _jsonl(tmp_path / "in" / "empty.jsonl", [])
    res = run_subprocess(["PrepareCorpus", "--local-scheduler", "--run-dir", str(tmp_path / "run"), "--corpus",
                          str(corpus)], tmp_path)
    assert res.code == FAILED, res.out[-3000:]
    one_error_line(res.out, r"InputError: corpus .*empty.jsonl has no documents")


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.mark.parametrize("kind", ["read_only", "full"])
def test_run_dir_read_only_or_full_is_refused_before_any_work(kind, inputs, tmp_path):
    mnt = tmp_path / "mnt"
    if kind == "read_only" and os.geteuid() != 0:
        mnt.mkdir()
        mnt.chmod(0o555)
    elif not _mount_tmpfs(mnt, "ro,size=1m" if kind == "read_only" else "size=2m"):
        pytest.skip("cannot mount a small tmpfs here")
    try:
        params = tiny_params(inputs, mnt / "run", tasks="none")
        res = run_cli(["RunAll", "--local-scheduler", *flags(params)], tmp_path)
        assert res.code == PARAM, res.out[-3000:]
        if kind == "read_only":
            one_error_line(res.out, r"--run-dir .*mnt/run: cannot create it \(Read-only file system|Permission")
        else:
            one_error_line(res.out, r"--run-dir .*mnt/run: about .* MB of disk needed by the stages still to run "
                                    r"\(.*models ~.*\) but only .* free there")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(mnt)], capture_output=True)
        mnt.chmod(0o755)
