"""Downstream evaluation of an exported model with EleutherAI's lm-evaluation-harness, offline.

Multiple-choice files (one ``{"query", "choices", "gold"}`` JSON object per line) become harness
tasks whose prompt is the harness's own for ARC and PIQA: ``"Question: ...\\nAnswer:"`` followed
by ``" <choice>"``, scored by log-likelihood, reporting ``acc`` and ``acc_norm`` (log-likelihood
divided by the choice's length in characters) with their standard errors. Held-out text becomes
a ``loglikelihood_rolling`` task (the harness's wikitext recipe): bits per byte, byte and word
perplexity. The per-token loss and perplexity are the one thing added here: they need the token
count, which comes from the same tokenizer the harness used.

Everything runs from local files: the model is loaded here with ``local_files_only`` and handed
to the harness's ``HFLM``; task data go through ``datasets`` packaged builders with the hub off.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from .config import ConfigError, EvalOptions
from .data import DataError
from .generate import resolve_model_dir

MC_METRICS = ("acc", "acc_norm")


def check_multiple_choice(path: Path) -> int:
    """Validate a ``{"query", "choices", "gold"}`` JSONL file; returns its number of examples."""
    count = 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{number}: line is not valid JSON") from None
        choices = record.get("choices") if isinstance(record, dict) else None
        if not isinstance(record, dict) or not isinstance(record.get("query"), str):
            raise DataError(f"{path}:{number}: needs a string field 'query'")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{path}:{number}: 'choices' must be a list of at least 2 strings")
        gold = record.get("gold")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise DataError(f"{path}:{number}: 'gold' must be the index of the correct choice (0..{len(choices) - 1})")
        count += 1
    if not count:
        raise DataError(f"{path}: no examples")
    return count


def multiple_choice_task(name: str, path: Path, cache_dir: str) -> dict:
    """A harness task config for a local multiple-choice file (prompt as the harness's ARC/PIQA)."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}, "cache_dir": cache_dir},
        "test_split": "test",
        "output_type": "multiple_choice",
        # ARC/PIQA queries read "Question: ..." (PIQA's with a trailing newline); the harness appends "\nAnswer:".
        "doc_to_text": "{% set q = query | trim %}{{ q if q.endswith('Answer:') else q ~ '\\nAnswer:' }}",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in MC_METRICS],
        "metadata": {"version": 1.0},
    }


def text_task(files: list[Path], text_field: str, cache_dir: str) -> dict:
    """A harness ``loglikelihood_rolling`` task over local documents (a text file, a JSONL line or a table row each)."""
    from .hf_datasets import builder_of

    builders = {builder_of(f) for f in files}
    if len(builders) != 1:
        raise DataError(f"--text files must be of one kind, got {', '.join(sorted(builders))}")
    builder = builders.pop()
    options = {"sample_by": "document"} if builder == "text" else {}
    field = "text" if builder == "text" else text_field
    return {
        "task": "heldout_text",
        "dataset_path": builder,
        "dataset_kwargs": {"data_files": {"test": [str(f) for f in files]}, "cache_dir": cache_dir, **options},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": field,
        "metric_list": [{"metric": m, "higher_is_better": False}
                        for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
        "metadata": {"version": 1.0},
    }


def quiet_rolling(hflm: type) -> type:
    """The harness's ``HFLM`` drawing one progress bar over the documents of a held-out text, instead
    of one more per batch of windows (a thousand bars for a long text)."""

    class QuietRolling(hflm):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None, **kwargs):
            # ``override_bs`` is given only by loglikelihood_rolling, which draws the bar over documents
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or override_bs is not None,
                                                 override_bs=override_bs, **kwargs)

    return QuietRolling


def check_text_files(files: list[Path], text_field: str) -> None:
    """Refuse ``--text`` files the harness cannot read before the model is loaded: one without text
    (the harness would stop on an empty split) or with bytes that are not UTF-8 (it reads strictly;
    ``prepare`` replaces them, but a held-out score must be of the text as it is)."""
    from .corpus import JSONL_SUFFIXES, TEXT_SUFFIXES, read_documents

    for path in files:
        if path.name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
            if any(doc.replaced_bytes for doc in read_documents([path], text_field)):  # "holds no text" raised inside
                raise DataError(f"--text {path} holds bytes that are not UTF-8; convert it to UTF-8 first "
                                "(e.g. iconv -f latin1 -t utf-8)")


def resolve_tasks(tasks: list[str], eval_dir: str | None) -> dict[str, Path]:
    """``arc_easy`` -> ``EVAL_DIR/arc_easy.jsonl``; a path to a ``.jsonl`` file is taken as given."""
    resolved = {}
    for task in tasks:
        path = Path(task)
        if not path.is_file():
            if eval_dir is None:
                raise ConfigError(f"task {task!r} is not a file; pass --eval-dir DIR holding {task}.jsonl")
            path = Path(eval_dir) / f"{task}.jsonl"
            if not path.is_file():
                raise DataError(f"task {task!r}: {path} does not exist")
        resolved[path.name.removesuffix(".jsonl")] = path
    return resolved


def run_max_length(model_dir: Path) -> int | None:
    """``data.seq_len`` of the run that exported ``model_dir`` (``RUN/model``), if it is one."""
    if not (model_dir.parent / "config.toml").is_file():
        return None
    from .runs import load_run_config

    return load_run_config(model_dir.parent).data.seq_len


def evaluate(model: str | Path, tasks: list[str] = (), eval_dir: str | None = None, text: list[str] = (),
             text_field: str = EvalOptions.text_field, limit: int | None = None, batch_size: int = EvalOptions.batch_size,
             device: str = EvalOptions.device,
             max_length: int | None = None) -> dict:
    """Zero-shot multiple-choice accuracy and held-out text loss of an exported model (or a run's)."""
    if not tasks and not text:
        raise ConfigError("nothing to evaluate: give --tasks and/or --text")
    if limit is not None and limit < 1:
        raise ConfigError("--limit must be >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("superpose eval needs lm-evaluation-harness: pip install 'superpose[eval]'") from None
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .corpus import expand_inputs
    from .progress import hf_progress_bars

    directory = resolve_model_dir(model)
    mc_files = resolve_tasks(list(tasks), eval_dir)
    counts = {name: check_multiple_choice(path) for name, path in mc_files.items()}
    text_files = expand_inputs(list(text)) if text else []
    check_text_files(text_files, text_field)
    text_length = max_length or run_max_length(directory)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with hf_progress_bars(False):  # no "Loading weights" bar: the harness draws one bar per task
        lm_model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    results = {"model": str(directory), "harness": f"lm_eval {lm_eval.__version__}", "limit": limit, "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="superpose-eval-") as cache:
        manager = TaskManager(include_defaults=False)
        if mc_files:
            # Contexts are scored at the model's full length, exactly as the harness does by default.
            harness = HFLM(pretrained=lm_model, tokenizer=tokenizer, batch_size=batch_size, device=device)
            configs = [multiple_choice_task(name, path, cache) for name, path in mc_files.items()]
            out = lm_eval.simple_evaluate(model=harness, tasks=configs, task_manager=manager, limit=limit,
                                          log_samples=False, verbosity="WARNING")
            for name, path in mc_files.items():
                scores = out["results"][name]
                results["tasks"][name] = {"file": str(path), "examples": min(limit or counts[name], counts[name]),
                                          **{k: scores[f"{k},none"] for m in MC_METRICS for k in (m, f"{m}_stderr")}}
        if text_files:
            harness = quiet_rolling(HFLM)(pretrained=lm_model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                                          max_length=text_length)
            try:
                out = lm_eval.simple_evaluate(model=harness, tasks=[text_task(text_files, text_field, cache)],
                                              task_manager=manager, limit=limit, log_samples=True, verbosity="WARNING")
            except (datasets.exceptions.DatasetGenerationError, KeyError) as err:
                raise DataError(f"--text {', '.join(map(str, text_files))}: no text to read ({err.__cause__ or err}); "
                                "check the files and --text-field") from None
            results["text"] = text_results(out, harness, text_files)
    return results


def text_results(out: dict, harness, files: list) -> dict:
    """Harness metrics of the held-out text, plus the per-token loss from the logged log-likelihoods."""
    scores = out["results"]["heldout_text"]
    samples = out["samples"]["heldout_text"]
    nll = -sum(float(s["filtered_resps"][0]) for s in samples)
    tokens = sum(len(harness.tok_encode(s["target"])) for s in samples)
    loss = nll / tokens
    return {
        "files": [str(f) for f in files],
        "documents": len(samples),
        "tokens": tokens,
        "max_length": harness.max_length,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": scores["bits_per_byte,none"],
        "byte_perplexity": scores["byte_perplexity,none"],
        "word_perplexity": scores["word_perplexity,none"],
    }


def format_results(results: dict) -> str:
    """A plain-text table of the results, one line per task."""
    lines = [f"model {results['model']} ({results['harness']}, 0-shot)"]
    for name, r in results["tasks"].items():
        lines.append(f"{name:<14} n={r['examples']:<5} acc {r['acc']:.4f} ± {r['acc_stderr']:.4f}   "
                     f"acc_norm {r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}")
    if "text" in results:
        t = results["text"]
        lines.append(f"{'held-out text':<14} {t['documents']} docs, {t['tokens']:,} tokens: loss {t['loss']:.4f} nats/token, "
                     f"perplexity {t['perplexity']:.2f}, {t['bits_per_byte']:.4f} bits/byte")
    return "\n".join(lines)
