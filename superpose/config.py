"""One typed config tree for every command: defaults live here and nowhere else.

A config is built from the dataclass defaults, then a TOML file, then ``--section.key=value``
overrides. Unknown sections or keys and values of the wrong type are rejected with a one-line
``ConfigError`` naming the key, before any work starts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import json
import math
import sys
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelConfig:
    preset: str = "tiny"  # a name from superpose.model.PRESETS, or a local HF model/config directory
    attn_implementation: str = "sdpa"  # sdpa | eager | any attention the transformers model supports
    loss_chunk_size: int | str = "auto"  # > 0: head + loss run this many positions at a time (no full logits); 0 = full; auto = per vocab (superpose.device_defaults)


@dataclass
class DataConfig:
    dir: str = "data/shakespeare"  # a directory written by `superpose prepare`
    corpus: str = "shakespeare"  # prepared into `dir` on first use if `dir` does not exist ("" = never)
    vocab_size: int = 8192  # BPE size used when `corpus` is prepared automatically
    seq_len: int = 128  # L: positions the model runs on, in every stage


@dataclass
class TSTConfig:
    bag_size: int = 4  # s: tokens averaged into one input position in phase 1 (1 = baseline)
    ratio: float = 0.3  # r: fraction of steps in phase 1 (0 = baseline)
    weighting: str = "uniform"  # uniform | power | exp | first
    mode: str = "full"  # full | input (bagged inputs only) | output (bag targets only)
    # Research levers (docs/when-tst-pays.md); the defaults are the paper's method.
    curriculum: list = field(default_factory=list)  # [[s, r], ...]: several phase-1 stages; replaces bag_size/ratio
    slot_weights: list = field(default_factory=list)  # explicit slot weights (>= s floats); replaces weighting
    anneal_to_ntp: bool = False  # slot weights move linearly to next-token-only over each phase-1 stage
    blend_steps: int = 0  # smooth switch: the last K phase-1 steps turn gradually into next-token steps
    lr_scale: float = 1.0  # LR multiplier during phase 1
    reset_optimizer: bool = False  # clear AdamW's moments when next-token training starts
    rewarmup_steps: int = 0  # linear LR re-warmup over the first next-token steps
    # The keys above are the shorthand of this list (config.stage_tables); a run's config.toml records it expanded.
    stages: list = field(default_factory=list)  # [[tst.stages]] tables (see below): the stages literally; empty = the shorthand's


@dataclass
class StageTable:
    """One [[tst.stages]] table. A stage runs for `steps` steps or a `fraction` of train.steps (one
    of the two; the last stage may give neither: it takes the steps left)."""

    bag_size: int = 0  # s, the tokens of one bag (1 = next-token prediction); every table must give it
    steps: int = 0  # the stage's length in steps
    fraction: float = 0.0  # or its length as a fraction of train.steps
    mode: str = "full"  # full | input | output (what the stage bags)
    weighting: str | list = "uniform"  # a slot weighting (uniform | power | exp | first) or >= s slot weights
    anneal: bool = False  # slot weights move linearly to next-token-only over the stage
    lr_scale: float = 1.0  # LR multiplier during the stage
    blend_steps: int = 0  # the stage's last K steps turn gradually into next-token steps
    rewarmup_steps: int = 0  # linear LR re-warmup over the stage's first steps


STAGE_KEYS = {f.name: f.default for f in dataclasses.fields(StageTable)}  # every key of a table, with its default
SHORTHAND = ("bag_size", "ratio", "weighting", "mode", "curriculum", "slot_weights", "anneal_to_ntp", "blend_steps",
             "lr_scale", "rewarmup_steps")


def stage_tables(tst: TSTConfig) -> list[dict]:
    """The stage list of a [tst] section: ``tst.stages`` (each table with every key of STAGE_KEYS),
    or, when it is empty, the expansion of the shorthand: one superposition stage of bag_size for a
    fraction ratio (or one per curriculum entry), then next-token prediction for the steps left."""
    if tst.stages:
        return [{**STAGE_KEYS, **table} for table in tst.stages]
    plan = [tuple(entry) for entry in tst.curriculum] or [(tst.bag_size, tst.ratio)]
    weighting = list(tst.slot_weights) if tst.slot_weights else tst.weighting
    tables = [{**STAGE_KEYS, "bag_size": s, "fraction": float(r), "mode": tst.mode, "weighting": weighting,
               "anneal": tst.anneal_to_ntp, "lr_scale": tst.lr_scale} for s, r in plan if s > 1 and r > 0]
    if tables:
        tables[-1]["blend_steps"] = tst.blend_steps
    return tables + [{**STAGE_KEYS, "bag_size": 1, "rewarmup_steps": tst.rewarmup_steps if tables else 0}]


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate, reached after the warmup
    min_lr_ratio: float = 0.0  # the LR decays linearly to lr * min_lr_ratio
    warmup_steps: int = 50  # linear warmup from 0 over the first steps
    decay_fraction: float = 0.1  # warmup-stable-decay: linear decay over the last fraction of steps
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on parameters with >= 2 dimensions only
    grad_clip: float = 1.0  # max global grad norm (0 = no clipping)


@dataclass
class TrainConfig:
    out_dir: str = "runs/tiny"  # the run directory (compare and sweep: the parent of one directory per arm)
    steps: int = 600  # optimizer steps in all, both phases included
    batch_size: int = 16  # global batch, in samples (windows), over all ranks and micro-batches
    micro_batch_size: int = 0  # per rank and forward pass; 0 = the whole per-rank batch at once
    seed: int = 0  # initial weights and data order (the windows of step t come from (seed, t))
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # CPU threads per process; 0 = the cores the load average leaves free (OMP_NUM_THREADS, if set, stands)
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (autocast; parameters and optimizer state stay fp32)
    compile: bool | str = "auto"  # auto (on for CUDA, off for CPU) | true | false: torch.compile each decoder block and the loss
    activation_checkpointing: str = "none"  # none | full | selective: recompute each decoder block's activations in backward
    eval_every: int = 100  # validate every this many steps, and after the last one
    eval_tokens: int = 65536  # held-out tokens per validation (next-token loss); 0 = whole split
    log_every: int = 10  # a train record in metrics.jsonl every this many steps, and after the last one
    checkpoint_every: int = 200  # 0 = only at the end
    keep_checkpoints: int = 2  # the newest this many checkpoints are kept
    checkpoint_format: str = "auto"  # auto (sharded under FSDP/HSDP, else gathered) | sharded (DCP, every rank its shards) | gathered
    async_checkpoint: bool = False  # sharded checkpoints are written in the background while training goes on
    max_bad_steps: int = 5  # consecutive non-finite steps tolerated before the run stops
    progress: bool = True  # tqdm progress bars (rank 0 only)
    tensorboard: bool = True  # TensorBoard scalars in out_dir/tensorboard (see superpose.tracking)
    wandb: bool = False  # also log to Weights & Biases (pip install 'superpose[wandb]')
    wandb_project: str = "superpose"  # W&B project of the run
    wandb_mode: str = "online"  # online | offline (no account needed; upload later with `wandb sync`)


@dataclass
class DistributedConfig:
    strategy: str = "ddp"  # ddp | fsdp | hsdp (used when launched with torchrun and WORLD_SIZE > 1)
    shard_size: int = 0  # hsdp: ranks per shard group (e.g. GPUs per node); the WORLD_SIZE / shard_size groups replicate
    param_dtype: str = "fp32"  # fsdp/hsdp mixed precision (WORLD_SIZE > 1): dtype of gathered parameters (fp32 | bf16)
    reduce_dtype: str = "fp32"  # fsdp/hsdp mixed precision (WORLD_SIZE > 1): dtype of gradient reduction


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tst: TSTConfig = field(default_factory=TSTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Options of the commands that take no run config: the defaults of the CLI flags and of the
# library functions behind them (superpose.data.prepare, compare.sweep, generate, evaluation).


@dataclass
class PrepareOptions:
    vocab_size: int = DataConfig.vocab_size  # size of the byte-level BPE to train (without --tokenizer)
    text_field: str = "text"  # JSONL field or Parquet/Arrow column holding the text
    val_fraction: float = 0.05  # documents held out for validation when no --valid inputs are given
    seed: int = 0  # seed of the held-out document draw
    num_proc: int = 1  # > 1: tokenise in this many processes with Hugging Face datasets


@dataclass
class SweepOptions:
    bag_sizes: list = field(default_factory=lambda: [2, 4, 6, 8])  # bag sizes s of the grid (the flag: comma-separated)
    ratios: list = field(default_factory=lambda: [0.2, 0.3, 0.5])  # phase-1 ratios r of the grid (the flag: comma-separated)


@dataclass
class GenerateOptions:
    prompt: str = ""  # text to continue ("" = start from the end-of-document token)
    max_new_tokens: int = 64  # tokens sampled after the prompt
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = no top-k filter
    samples: int = 1  # continuations of the prompt
    seed: int = 0  # seed of the sampling


@dataclass
class EvalOptions:
    text_field: str = "text"  # JSONL field or table column holding the text of --text files
    batch_size: int = 16  # windows per forward
    device: str = "auto"  # auto | cpu | cuda


COMMAND_OPTIONS = {"prepare": PrepareOptions, "sweep": SweepOptions, "generate": GenerateOptions, "eval": EvalOptions}


WEIGHTINGS = ("uniform", "power", "exp", "first")  # slot weightings of the multi-hot loss (loss.slot_weights)
MODES = ("full", "input", "output")  # what a stage bags: inputs and targets, inputs only, targets only
CORPORA = ("shakespeare",)  # the embedded corpora data.corpus may name
CHOICES = {
    ("tst", "weighting"): WEIGHTINGS,
    ("tst", "mode"): MODES,
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("train", "precision"): ("auto", "fp32", "bf16"),
    ("train", "activation_checkpointing"): ("none", "full", "selective"),
    ("train", "wandb_mode"): ("online", "offline"),
    ("train", "checkpoint_format"): ("auto", "sharded", "gathered"),
    ("distributed", "strategy"): ("ddp", "fsdp", "hsdp"),
    ("distributed", "param_dtype"): ("fp32", "bf16"),
    ("distributed", "reduce_dtype"): ("fp32", "bf16"),
}


def _coerce(section: str, key: str, value, typ):
    name = f"{section}.{key}"
    if typing.get_origin(typ) is types.UnionType:  # e.g. int | str: the first type that takes the value
        for member in typing.get_args(typ):
            with contextlib.suppress(ConfigError):
                return _coerce(section, key, value, member)
        raise ConfigError(f"{name} must be {' or '.join(t.__name__ for t in typing.get_args(typ))}, got {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ is list:
        if isinstance(value, list):
            return value
    else:  # pragma: no cover - every field above has one of these types
        raise TypeError(f"unsupported config type {typ} for {name}")
    raise ConfigError(f"{name} must be {typ.__name__}, got {value!r} ({type(value).__name__})")


def _apply(cfg: Config, updates: dict, origin: str) -> None:
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    for section, values in updates.items():
        if section not in sections:
            raise ConfigError(f"unknown config section [{section}] in {origin}; known: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] in {origin} must be a table of keys")
        sub = getattr(cfg, section)
        hints = typing.get_type_hints(type(sub))
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(
                    f"unknown config key {section}.{key} in {origin}; known: {', '.join(hints)}"
                )
            setattr(sub, key, _coerce(section, key, value, hints[key]))


def parse_override(text: str) -> dict:
    """``--optim.lr=1e-3`` (or ``optim.lr=1e-3``) -> ``{"optim": {"lr": 0.001}}``. Values are TOML
    literals; anything that does not parse as one is taken as a string."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body or "." not in body.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like --section.key=value")
    dotted, raw = body.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return {section.replace("-", "_"): {key.replace("-", "_"): value}}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- TOML file <- overrides, then validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory; give a TOML file (a run's config is RUN/config.toml)")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        _apply(cfg, read_toml(path), str(path))
    for text in overrides:
        _apply(cfg, parse_override(text), "command line")
    validate(cfg)
    return cfg


def read_toml(path: Path) -> dict:
    """A TOML file as a dict (tomllib, or tomli before Python 3.11); a one-line error if it does not parse."""
    try:
        return tomllib.loads(Path(path).read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    _apply(cfg, data, "saved config")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key} = {value!r} is not one of {', '.join(allowed)}")
    checks = [
        (cfg.tst.bag_size >= 1, "tst.bag_size must be an integer >= 1 (1 = plain next-token baseline)"),
        (0.0 <= cfg.tst.ratio <= 1.0, "tst.ratio must be in [0, 1] (the fraction of steps in phase 1)"),
        (cfg.data.seq_len >= 1, "data.seq_len must be >= 1"),
        (cfg.data.corpus in CORPORA + ("",), f"data.corpus = {cfg.data.corpus!r}: only {', '.join(map(repr, CORPORA))} is embedded "
         "(\"\" = never prepare); run `superpose prepare` for other data"),
        (cfg.train.compile in ("auto", True, False), "train.compile must be auto, true or false"),
        (cfg.model.loss_chunk_size == "auto" or isinstance(cfg.model.loss_chunk_size, int) and cfg.model.loss_chunk_size >= 0,
         "model.loss_chunk_size must be auto or an integer >= 0 (0 = the full logits at once)"),
        (cfg.data.vocab_size >= 256 + 1, "data.vocab_size must be > 256 (byte-level BPE needs the 256 bytes)"),
        (cfg.train.steps >= 1, "train.steps must be >= 1"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.train.micro_batch_size >= 0, "train.micro_batch_size must be >= 0"),
        (cfg.train.threads >= 0, "train.threads must be >= 0 (0 = chosen automatically)"),
        (cfg.train.eval_every >= 1, "train.eval_every must be >= 1"),
        (cfg.train.eval_tokens >= 0, "train.eval_tokens must be >= 0"),
        (cfg.train.log_every >= 1, "train.log_every must be >= 1"),
        (cfg.train.checkpoint_every >= 0, "train.checkpoint_every must be >= 0"),
        (cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (cfg.train.max_bad_steps >= 1, "train.max_bad_steps must be >= 1"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (0.0 <= cfg.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]"),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (0.0 <= cfg.optim.decay_fraction <= 1.0, "optim.decay_fraction must be in [0, 1]"),
        (0.0 <= cfg.optim.beta1 < 1.0 and 0.0 <= cfg.optim.beta2 < 1.0, "optim.beta1/beta2 must be in [0, 1)"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (cfg.optim.grad_clip >= 0, "optim.grad_clip must be >= 0"),
        (not (cfg.train.async_checkpoint and cfg.train.checkpoint_format == "gathered"),
         "train.async_checkpoint needs sharded checkpoints; set train.checkpoint_format = 'sharded' (or 'auto' under FSDP/HSDP)"),
        (cfg.distributed.strategy != "ddp" or (cfg.distributed.param_dtype, cfg.distributed.reduce_dtype) == ("fp32", "fp32"),
         "distributed.param_dtype/reduce_dtype apply to strategies fsdp and hsdp only; DDP keeps fp32 "
         "(use train.precision=bf16)"),
        (cfg.distributed.strategy == "hsdp" or cfg.distributed.shard_size == 0,
         "distributed.shard_size applies to strategy hsdp only; set distributed.strategy=hsdp or drop shard_size"),
        (cfg.distributed.strategy != "hsdp" or cfg.distributed.shard_size >= 1,
         "distributed.strategy = hsdp needs distributed.shard_size >= 1 (ranks per shard group, e.g. GPUs per node)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _validate_levers(cfg.tst, cfg.train.steps)
    if cfg.train.micro_batch_size and cfg.train.batch_size % cfg.train.micro_batch_size:
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) must be a multiple of "
            f"train.micro_batch_size ({cfg.train.micro_batch_size})"
        )


def _validate_levers(tst: TSTConfig, steps: int) -> None:
    for entry in tst.curriculum:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int) and entry[0] >= 2
                and isinstance(entry[1], (int, float)) and 0 < entry[1] <= 1):
            raise ConfigError(f"tst.curriculum entry {entry!r} must be [bag_size >= 2, ratio in (0, 1]]")
    if sum(entry[1] for entry in tst.curriculum) > 1:
        raise ConfigError("tst.curriculum ratios must sum to at most 1")
    largest = max([tst.bag_size] + [entry[0] for entry in tst.curriculum])
    if tst.slot_weights and (
        len(tst.slot_weights) < largest
        or not all(isinstance(w, (int, float)) and w >= 0 for w in tst.slot_weights)
        or tst.slot_weights[0] <= 0
    ):
        raise ConfigError(f"tst.slot_weights must list >= {largest} non-negative numbers, the first positive")
    if tst.blend_steps < 0 or tst.rewarmup_steps < 0:
        raise ConfigError("tst.blend_steps and tst.rewarmup_steps must be >= 0")
    if tst.lr_scale <= 0:
        raise ConfigError("tst.lr_scale must be > 0")
    if tst.stages:
        _validate_stages(tst, steps)


def _validate_stages(tst: TSTConfig, steps: int) -> None:
    """Each [[tst.stages]] table is complete and sane, the list covers train.steps, phase 1 comes
    first, and the shorthand keys are untouched or say the same (as in a run's own config.toml)."""
    covered, tables = 0.0, stage_tables(tst)  # in units of train.steps
    for index, (table, stage) in enumerate(zip(tst.stages, tables), 1):
        where = f"tst.stages[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table ([[tst.stages]] with bag_size = ...)")
        unknown = set(table) - set(STAGE_KEYS)
        if unknown:
            raise ConfigError(f"unknown key {where}.{sorted(unknown)[0]}; known: {', '.join(STAGE_KEYS)}")
        integer = lambda key, low: _integer(stage[key]) and stage[key] >= low  # noqa: E731
        weighting = stage["weighting"]
        checks = [  # in order, each one only once the ones before it hold (later ones rely on the types)
            (lambda: integer("bag_size", 1), "bag_size must be an integer >= 1"),
            (lambda: integer("steps", 0), "steps must be an integer >= 0"),
            (lambda: _number(stage["fraction"]) and 0 <= stage["fraction"] <= 1, "fraction must be a number in [0, 1]"),
            (lambda: not (stage["steps"] and stage["fraction"]), "give steps or fraction, not both"),
            (lambda: index == len(tables) or stage["steps"] or stage["fraction"],
             "needs steps or fraction (only the last stage may run to the end without them)"),
            (lambda: stage["mode"] in MODES, f"mode must be one of {', '.join(MODES)}"),
            (lambda: weighting in WEIGHTINGS or (isinstance(weighting, list) and len(weighting) >= stage["bag_size"]
                                                 and all(_number(w) and w >= 0 for w in weighting) and weighting[0] > 0),
             f"weighting must be one of {', '.join(WEIGHTINGS)} or >= bag_size non-negative numbers, the first positive"),
            (lambda: isinstance(stage["anneal"], bool), "anneal must be true or false"),
            (lambda: _number(stage["lr_scale"]) and stage["lr_scale"] > 0, "lr_scale must be a number > 0"),
            (lambda: integer("blend_steps", 0), "blend_steps must be an integer >= 0"),
            (lambda: stage["bag_size"] > 1 or not stage["blend_steps"],
             "blend_steps turn bag steps into next-token steps: a bag_size 1 stage has none"),
            (lambda: integer("rewarmup_steps", 0), "rewarmup_steps must be an integer >= 0"),
            (lambda: stage["bag_size"] == 1 or all(t["bag_size"] > 1 for t in tables[: index - 1]),
             "a superposition stage after next-token training: phase 1 (bag_size > 1) comes first"),
        ]
        for ok, message in checks:
            if not ok():
                raise ConfigError(f"{where}: {message}")
        covered += stage["fraction"] + stage["steps"] / steps
    open_end = not (tables[-1]["steps"] or tables[-1]["fraction"])
    if covered > 1 + 1e-9 or (not open_end and covered < 1 - 0.5 / steps):
        raise ConfigError(f"tst.stages cover {covered * steps:g} of train.steps = {steps} steps; they must cover them all "
                          "(a last stage without steps or fraction runs to the end)")
    defaults = TSTConfig()
    touched = [key for key in SHORTHAND if getattr(tst, key) != getattr(defaults, key)]
    if touched and stage_tables(dataclasses.replace(tst, stages=[])) != tables:
        raise ConfigError(f"tst.stages is given, so tst.{touched[0]} (its shorthand) must not be set as well")


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def field_comments(cls: type) -> dict[str, str]:
    """Each field's trailing ``# comment`` in the source of dataclass ``cls``: the config's own
    documentation, read by ``reference_markdown`` so that the reference cannot drift from the code."""
    fields, comments = {f.name for f in dataclasses.fields(cls)}, {}
    name, first = None, True  # the field that the current logical line defines; at its first token
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.NEWLINE:
            name, first = None, True
        elif tok.type in (tokenize.INDENT, tokenize.DEDENT, tokenize.NL) or (first and tok.type == tokenize.COMMENT):
            continue  # a comment on a line of its own belongs to no field
        elif first:
            name, first = tok.string if tok.type == tokenize.NAME and tok.string in fields else None, False
        elif tok.type == tokenize.COMMENT and name is not None:
            comments[name] = " ".join(filter(None, [comments.get(name), tok.string.lstrip("#").strip()]))
    return comments


def reference_markdown() -> str:
    """The config reference (docs/reference.md, below its marker): every section and key of
    ``Config``, the keys of a [[tst.stages]] table and the flags of the commands that take no run
    config, each with its type, default, comment and allowed choices. Written by scripts/reference.py."""
    tables = [(f"[{section}]", section + ".", cls) for section, cls in typing.get_type_hints(Config).items()]
    tables.append(("[[tst.stages]], one table per stage", "tst.stages[].", StageTable))
    tables += [(f"`superpose {command}` flags", "--", cls) for command, cls in COMMAND_OPTIONS.items()]
    lines = []
    for title, prefix, cls in tables:
        hints, comments, defaults = typing.get_type_hints(cls), field_comments(cls), cls()
        lines += [f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            meaning = comments.get(f.name, "").replace("|", "\\|")  # a bare | would end the table cell
            if (prefix[:-1], f.name) in CHOICES:
                meaning += "; one of " + ", ".join(f"`{c}`" for c in CHOICES[prefix[:-1], f.name])
            default = json.dumps(getattr(defaults, f.name))  # a TOML literal for every type used here
            key = prefix + (f.name.replace("_", "-") if prefix == "--" else f.name)
            kind = getattr(hints[f.name], "__name__", str(hints[f.name])).replace("|", "or")
            lines.append(f"| `{key}` | {kind} | `{default}` | {meaning} |")
        lines.append("")
    return "\n".join(lines)
