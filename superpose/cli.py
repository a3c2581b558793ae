"""The `superpose` command: parses arguments and calls the library; nothing else lives here."""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .config import EvalOptions, GenerateOptions, PrepareOptions, SweepOptions  # torch-free
from .errors import ConfigError, Interrupted, TrainingError, UserError
from .launch import is_main_process

# OSError: a full disk, a missing file, no permission; the message names the path.
USER_ERRORS = (UserError, OSError)


def cmd_prepare(args) -> None:
    from .config import check_prepare_options

    check_prepare_options(args.val_fraction, args.vocab_size, args.num_proc, args.tokenizer)  # before torch loads
    from .data import prepare

    meta = prepare(
        args.out,
        inputs=args.input or None,
        valid_inputs=args.valid or None,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        seed=args.seed,
        progress=not args.quiet,
        num_proc=args.num_proc,
        force=args.force,
    )
    splits = meta["splits"]
    print(
        f"wrote {args.out}: vocab {meta['vocab_size']}, train {splits['train']['tokens']:,} tokens "
        f"({splits['train']['documents']} docs), val {splits['val']['tokens']:,} tokens "
        f"({splits['val']['documents']} docs), {splits['train']['bytes_per_token']:.2f} bytes/token"
    )
    if meta["non_utf8_documents_replaced"]:
        print(f"note: {meta['non_utf8_documents_replaced']} documents held bytes that are not UTF-8; "
              "they were replaced with U+FFFD")


def cmd_train(args) -> None:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors answer before torch is imported
    from .distributed import shutdown
    from .train import train

    try:
        info = train(cfg, resume=args.resume, allow_config_change=args.allow_config_change,
                     allow_data_change=args.allow_data_change)
    finally:
        shutdown()
    if info is not None:
        print(f"done: val loss {info['val_loss']:.4f}, {info['val_bpb']:.4f} bits/byte; model in {cfg.train.out_dir}/model")


def cmd_compare(args) -> None:
    from .config import load_config

    if args.runs:
        if args.config or args.overrides:
            raise ConfigError("--runs reports on existing runs; it takes no config or overrides")
        check_run_dirs(args.runs)
        from .compare import compare_runs, print_summary

        summary, out = compare_runs(*args.runs, out=args.out, force=args.force)
    else:
        cfg = load_config(args.config, args.overrides)  # config errors answer before torch is imported
        from .compare import compare, print_summary
        from .distributed import shutdown

        try:
            summary, out = compare(cfg)
        finally:
            shutdown()
    if summary is not None:
        print_summary(summary, out)
        _fail_if_arms_failed(summary["failed"])


def _fail_if_arms_failed(failed: dict[str, str]) -> None:
    if failed:
        raise TrainingError(f"arm(s) {', '.join(failed)} failed; the report lists them without their curves")


def cmd_sweep(args) -> None:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors answer before numpy and torch are imported
    bag_sizes = parse_list(args.bag_sizes, int, "--bag-sizes") if args.bag_sizes is not None else None
    ratios = parse_list(args.ratios, float, "--ratios") if args.ratios is not None else None
    from .compare import print_sweep, sweep  # torch-free until an arm trains
    from .distributed import shutdown

    try:
        rows, root, failed = sweep(cfg, bag_sizes, ratios)
    finally:
        shutdown()
    if rows:
        print_sweep(rows, root, failed)
        _fail_if_arms_failed(failed)


def parse_list(text: str, kind: type, name: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{name} must be a comma-separated list of {kind.__name__}s, got {text!r}") from None
    if not values:
        raise ConfigError(f"{name} is empty")
    return values


def check_run_dirs(paths: list[str]) -> None:
    """A wrong run directory answers at once, before the analysis modules are imported."""
    from .files import dir_kind

    for path in paths:
        if dir_kind(path) not in ("run", "comparison"):
            raise ConfigError(f"{path} is "
                              f"{'not there' if not os.path.exists(path) else 'neither a run nor a compare or sweep directory'}")


def cmd_report(args) -> None:
    check_run_dirs(args.runs)
    from .compare import print_summary, report_runs

    summary, out = report_runs(args.runs, out=args.out, force=args.force)
    print_summary(summary, out)


def cmd_verify(args) -> None:
    from .errors import CheckpointError
    from .integrity import verify_targets

    results = verify_targets(args.path)
    for directory, found in results:
        print(f"ok       {directory}" if found is None else f"DAMAGED  {directory}: {found}")
    damaged = sum(found is not None for _, found in results)
    if damaged:
        raise CheckpointError(f"{damaged} of {len(results)} directories failed verification")


def cmd_export(args) -> None:
    from pathlib import Path

    from .files import check_replace
    from .runs import CHECKPOINTS, require_checkpoint

    # the arguments are checked before torch is imported; export_checkpoint checks them again, and the rest
    require_checkpoint(args.checkpoint, "CHECKPOINT_DIR", Path("RUN") / CHECKPOINTS / "step-00000100")
    check_replace(args.out_dir, "model", "OUT_DIR", args.force)
    from .export import export_checkpoint

    info = export_checkpoint(args.checkpoint, args.out_dir, force=args.force, allow_data_change=args.allow_data_change)
    print(f"wrote {args.out_dir}: the model at step {info['steps']} of {args.checkpoint}")


def cmd_generate(args) -> None:
    from .generate import generate

    for text in generate(args.model, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.samples, args.seed):
        print(text)
        print("---")


def cmd_eval(args) -> None:
    import json

    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else []
    if not tasks and not args.text:  # answered before the harness and torch load
        raise ConfigError("nothing to evaluate: give --tasks and/or --text")
    from .evaluation import evaluate, format_results
    from .files import atomic_write_text

    results = evaluate(args.model, tasks, args.eval_dir, args.text or [], args.text_field, args.limit,
                       args.batch_size, args.device, args.max_length)
    print(format_results(results))
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=2))


CONFIG_EPILOG = (
    "config sections: [model] [data] [tst] [optim] [train] [distributed]; every key is listed with its default and "
    "meaning in docs/reference.md. Override any key: --section.key=value (e.g. --train.steps=600)"
)


def build_parser() -> argparse.ArgumentParser:
    """The commands and their flags; the defaults of the flags are the config module's option tables."""
    prep, grid, gen, ev = PrepareOptions(), SweepOptions(), GenerateOptions(), EvalOptions()
    parser = argparse.ArgumentParser(prog="superpose", description="Token Superposition Training for causal LMs")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"superpose {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenise a corpus into token shards")
    p.add_argument("--out", required=True, help="output data directory")
    p.add_argument("--input", action="append",
                   help="file, directory or glob (.txt .md .jsonl .jsonl.gz .parquet .arrow); repeatable; "
                        "default: embedded Shakespeare")
    p.add_argument("--valid", action="append",
                   help="held-out validation inputs (default: hold out --val-fraction of the documents)")
    p.add_argument("--tokenizer", help="tokenizer.json or vocab.json+merges.txt directory (default: train a byte-level BPE)")
    p.add_argument("--vocab-size", type=int, default=prep.vocab_size, help="size of the BPE to train")
    p.add_argument("--text-field", "--text-column", default=prep.text_field,
                   help="JSONL field or Parquet/Arrow column holding the text")
    p.add_argument("--num-proc", type=int, default=prep.num_proc,
                   help="tokenise in N processes with Hugging Face datasets (used for .parquet/.arrow)")
    p.add_argument("--val-fraction", type=float, default=prep.val_fraction)
    p.add_argument("--seed", type=int, default=prep.seed)
    p.add_argument("--force", action="store_true",
                   help="replace --out if it already holds prepared data (nothing else is ever replaced)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train baseline or TST from a config", epilog=CONFIG_EPILOG)
    p.add_argument("config", nargs="?", help="TOML config (default: built-in defaults)")
    p.add_argument("--resume", default="never", help="never | auto (newest complete checkpoint) | a checkpoint directory")
    p.add_argument("--allow-config-change", action="store_true", help="resume even if the config changes the run")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume even if data.dir now holds other data than the run trained on (recorded in metrics.jsonl)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="train a baseline and TST at equal FLOPs and report on them",
                       epilog="override any key: --section.key=value; the baseline is the config with tst.ratio = 0")
    p.add_argument("config", nargs="?", help="TOML config of the TST arm (runs go to train.out_dir/{baseline,tst,report})")
    p.add_argument("--runs", nargs=2, metavar=("BASELINE_DIR", "TST_DIR"), help="report on two existing comparable runs instead")
    p.add_argument("--out", help="report directory for --runs (default: next to TST_DIR, named report)")
    p.add_argument("--force", action="store_true", help="with --runs: replace the report directory if it holds a report")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", help="train a grid of (bag size, ratio) plus a baseline at the same budget",
                       epilog="override any key: --section.key=value; finished grid points are not rerun")
    p.add_argument("config", nargs="?", help="TOML config (runs go to train.out_dir/<arm>)")
    p.add_argument("--bag-sizes", help=f"comma-separated bag sizes s (default {','.join(map(str, grid.bag_sizes))})")
    p.add_argument("--ratios", help=f"comma-separated phase-1 ratios r (default {','.join(map(str, grid.ratios))})")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="regenerate the comparison report from existing run directories")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="runs (a compare or sweep directory stands for its arms); the first baseline among them is the reference")
    p.add_argument("--out",
                   help="report directory (default: next to the first run, named report; in a compare directory, its report)")
    p.add_argument("--force", action="store_true", help="replace the report directory if it already holds a report")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("verify",
                       help="check checkpoints and exported models against their checksums (exit 0 = intact, 2 = damaged)")
    p.add_argument("path", help="a run directory (all its checkpoints and model/), a compare or sweep directory (every arm), "
                                "a checkpoint, model or prepared data directory")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("export", help="write the model of a checkpoint (sharded or gathered) as a Hugging Face model directory")
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="a checkpoint directory, e.g. RUN/checkpoints/step-00000600")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the model directory to write: new, empty, or an export (with --force)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT_DIR if it holds an exported model (nothing else is ever replaced)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="export even if the run's data.dir now holds other data "
                        "(its tokenizer is used; superpose.json records it)")
    p.add_argument("--quiet", action="store_true", help="accepted for compatibility: an export draws no progress bars")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="sample text from a run or an exported model directory")
    p.add_argument("model", help="run directory (uses RUN/model) or HF model directory")
    p.add_argument("--prompt", default=gen.prompt)
    p.add_argument("--max-new-tokens", type=int, default=gen.max_new_tokens)
    p.add_argument("--temperature", type=float, default=gen.temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=gen.top_k)
    p.add_argument("--samples", type=int, default=gen.samples)
    p.add_argument("--seed", type=int, default=gen.seed)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="zero-shot multiple-choice accuracy and held-out loss with lm-evaluation-harness")
    p.add_argument("model", help="run directory (uses RUN/model) or HF model directory")
    p.add_argument("--tasks", help="comma-separated {query, choices, gold} JSONL tasks: NAME (EVAL_DIR/NAME.jsonl) or a path")
    p.add_argument("--eval-dir", help="directory holding NAME.jsonl for each task name")
    p.add_argument("--text", action="append",
                   help="held-out text (.txt .md .jsonl(.gz) .parquet .arrow) for loss, perplexity, bits/byte; repeatable")
    p.add_argument("--text-field", default=ev.text_field, help="JSONL field or table column holding the text")
    p.add_argument("--limit", type=int, help="only the first N examples of each task (documents of --text)")
    p.add_argument("--batch-size", type=int, default=ev.batch_size)
    p.add_argument("--device", default=ev.device, help="auto | cpu | cuda")
    p.add_argument("--max-length", type=int, help="positions per window for --text (default: the run's data.seq_len)")
    p.add_argument("--out", help="also write the results as JSON to this file")
    p.set_defaults(func=cmd_eval)
    return parser


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the other arguments, the config overrides): ``--section.key=value`` and ``--section.key value``
    (joined into the first form) are overrides, taken out before argparse sees them, so a value
    may hold spaces (argparse would take such an argument for the config file). Only dotted flags
    are overrides: ``--out dir`` and friends are left alone, and a dotted flag without a value too."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = str(argv[i])
        dotted = arg.startswith("--") and "." in arg.split("=", 1)[0]
        if dotted and "=" in arg:
            overrides.append(arg)
        elif dotted and i + 1 < len(argv) and not str(argv[i + 1]).startswith("--"):
            overrides.append(f"{arg}={argv[i + 1]}")
            i += 1
        else:
            rest.append(argv[i])
        i += 1
    return rest, overrides


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    for arg in rest:
        if str(arg).startswith("--") and "." in str(arg).split("=", 1)[0]:  # what split_overrides left: no value
            parser.error(f"{arg} needs a value: {arg}=VALUE (a config key, see docs/reference.md)")
    args = parser.parse_args(rest)
    if overrides and args.command not in ("train", "compare", "sweep"):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    args.overrides = overrides
    try:
        args.func(args)
    except Interrupted as stop:
        if is_main_process():
            print(f"superpose: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a training loop
        if args.debug:
            raise
        print("\nsuperpose: aborted (the newest complete checkpoint, if any, is where --resume auto continues)", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if args.debug or not isinstance(err, USER_ERRORS):
            raise
        message = " ".join(str(err).splitlines())  # one line, whatever the library said
        print(f"superpose: error: {message}", file=sys.stderr)
        sys.exit(2)
