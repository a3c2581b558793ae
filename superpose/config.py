"""One typed config tree for every command: defaults and checks live here and nowhere else.

A config is built from the dataclass defaults, then a TOML file, then ``--section.key=value``
overrides. Every field carries its default, its type (``Literal`` for choices) and, where it has
one, its check (``setting``); a section checks itself when it is built, so unknown sections or
keys, values of the wrong type and values out of range are a one-line ``ConfigError`` naming the
key, before any work starts.

The ``[tst]`` shorthand (``bag_size``, ``ratio``, ...) is expanded once, when the section is built,
into ``tst.stages``: typed ``StageConfig`` tables, the one form the rest of superpose reads.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

from .errors import ConfigError, DataError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Weighting = Literal["uniform", "power", "exp", "first"]  # slot weightings of the multi-hot loss (loss.slot_weight_vector)
Mode = Literal["full", "input", "output"]  # what a stage bags: inputs and targets, inputs only, targets only
WEIGHTINGS, MODES = typing.get_args(Weighting), typing.get_args(Mode)
CORPORA = ("shakespeare",)  # the embedded corpora data.corpus may name
AUTO_KEYS = ("train.precision", "train.compile", "model.loss_chunk_size")  # "auto" is per device (superpose.device_defaults)


def setting(default, check: Callable[[Any], bool] | None = None, rule: str = ""):
    """A field with its default and, optionally, its check: ``check(value)`` must hold, and the
    error reads "<key> <rule>" (e.g. ``setting(600, lambda v: v >= 1, "must be >= 1")``)."""
    meta = {"check": check, "rule": rule} if check else {}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_ok(value, hint) -> bool:
    if typing.get_origin(hint) is Literal:
        return value in typing.get_args(hint)
    if hint is float:
        return _number(value)
    if hint is int:
        return _integer(value)
    return isinstance(value, hint)


def type_name(hint) -> str:
    """How the reference names a field's type: a ``Literal`` is a str with choices."""
    if typing.get_origin(hint) is Literal:
        return "str"
    return getattr(hint, "__name__", str(hint)).replace("|", "or")


def choices(cls: type, name: str) -> tuple:
    """The allowed values of a ``Literal`` field (empty for any other)."""
    hint = typing.get_type_hints(cls)[name]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


class Section:
    """Base of the config sections: on construction every field is checked against its type (a
    whole number is accepted as a float) and its ``setting`` check, then the section's own
    ``check`` (rules across its fields). ``NAME`` prefixes the keys in errors."""

    NAME: ClassVar[str] = ""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            if not _type_ok(value, hint):
                raise ConfigError(self._type_error(f, value, hint))
            if hint is float and not math.isfinite(value):
                raise ConfigError(f"{self.key(f.name)} must be a finite number, got {value!r}")
            if hint is float and not isinstance(value, float):
                object.__setattr__(self, f.name, float(value))
            check = f.metadata.get("check")
            if check is not None and not check(value):
                raise ConfigError(f"{self.key(f.name)} {f.metadata['rule']}")
        self.check()

    def check(self) -> None:
        """Rules that involve several fields of the section (none by default)."""

    def key(self, name: str) -> str:
        return f"{self.NAME}.{name}"

    def _type_error(self, f: dataclasses.Field, value, hint) -> str:
        if typing.get_origin(hint) is Literal:
            return f"{self.key(f.name)} = {value!r} is not one of {', '.join(typing.get_args(hint))}"
        return f"{self.key(f.name)} must be {type_name(hint)}, got {value!r} ({type(value).__name__})"


@dataclass
class ModelConfig(Section):
    NAME: ClassVar[str] = "model"
    preset: str = "tiny"  # a name from superpose.model.PRESETS, or a local HF model/config directory
    attn_implementation: str = "sdpa"  # sdpa | eager | any attention the transformers model supports
    loss_chunk_size: int | str = setting(  # > 0: head + loss run this many positions at a time (no full logits);
        "auto", lambda v: v == "auto" or (_integer(v) and v >= 0),  # 0 = the full logits;
        "must be auto or an integer >= 0 (0 = the full logits at once)")  # auto = by the vocabulary (superpose.device_defaults)


@dataclass
class DataConfig(Section):
    NAME: ClassVar[str] = "data"
    dir: str = "data/shakespeare"  # a directory written by `superpose prepare`
    corpus: str = "shakespeare"  # prepared into `dir` on first use if `dir` does not exist ("" = never)
    vocab_size: int = setting(  # BPE size used when `corpus` is prepared automatically
        8192, lambda v: v > 256, "must be > 256 (byte-level BPE needs the 256 bytes)")
    seq_len: int = setting(128, lambda v: v >= 1, "must be >= 1")  # L: positions the model runs on, in every stage

    def check(self) -> None:
        if self.corpus not in CORPORA + ("",):
            raise ConfigError(f"data.corpus = {self.corpus!r}: only {', '.join(map(repr, CORPORA))} is embedded "
                              "(\"\" = never prepare); run `superpose prepare` for other data")


def _slot_weights_ok(weights, bag_size: int) -> bool:
    """Explicit slot weights: at least ``bag_size`` non-negative numbers, the first positive."""
    return (isinstance(weights, list) and len(weights) >= bag_size and all(_number(w) and w >= 0 for w in weights)
            and weights[0] > 0)


@dataclass(frozen=True)
class StageConfig(Section):
    """One [[tst.stages]] table. A stage runs for `steps` steps or a `fraction` of train.steps (one
    of the two; the last stage may give neither: it takes the steps left)."""

    bag_size: int = setting(  # s, the tokens of one bag (1 = next-token prediction); every table must give it
        0, lambda v: v >= 1, "must be an integer >= 1")
    steps: int = setting(0, lambda v: v >= 0, "must be an integer >= 0")  # the stage's length in steps
    fraction: float = setting(  # or its length as a fraction of train.steps
        0.0, lambda v: 0 <= v <= 1, "must be a number in [0, 1]")
    mode: Mode = "full"  # what the stage bags
    weighting: str | list = "uniform"  # a slot weighting (uniform | power | exp | first) or >= s slot weights
    anneal: bool = False  # slot weights move linearly to next-token-only over the stage
    lr_scale: float = setting(1.0, lambda v: v > 0, "must be a number > 0")  # LR multiplier during the stage
    blend_steps: int = setting(  # the stage's last K steps turn gradually into next-token steps
        0, lambda v: v >= 0, "must be an integer >= 0")
    rewarmup_steps: int = setting(  # linear LR re-warmup over the stage's first steps
        0, lambda v: v >= 0, "must be an integer >= 0")

    def check(self) -> None:
        if self.steps and self.fraction:
            raise ConfigError("give steps or fraction, not both")
        if not (self.weighting in WEIGHTINGS or _slot_weights_ok(self.weighting, self.bag_size)):
            raise ConfigError(f"weighting must be one of {', '.join(WEIGHTINGS)} or >= bag_size non-negative numbers, "
                              "the first positive")
        if self.bag_size == 1 and self.blend_steps:
            raise ConfigError("blend_steps turn bag steps into next-token steps: a bag_size 1 stage has none")

    @property
    def open_ended(self) -> bool:
        """Neither steps nor fraction: the stage runs to the end of the run."""
        return not (self.steps or self.fraction)

    def key(self, name: str) -> str:
        return name  # TSTConfig names the table: "tst.stages[i]: <key> ..."

    def _type_error(self, f: dataclasses.Field, value, hint) -> str:
        """A table's errors say what the key takes (its check's words), whatever was wrong."""
        if f.metadata.get("rule"):
            return f"{f.name} {f.metadata['rule']}"
        if typing.get_origin(hint) is Literal:
            return f"{f.name} must be one of {', '.join(typing.get_args(hint))}"
        return f"{f.name} must be true or false" if hint is bool else f"{f.name} must be {type_name(hint)}"


SHORTHAND = ("bag_size", "ratio", "weighting", "mode", "curriculum", "slot_weights", "anneal_to_ntp", "blend_steps",
             "lr_scale", "rewarmup_steps")


@dataclass(frozen=True)
class TSTConfig(Section):
    """The stages of a run: ``stages`` literally, or the shorthand (the keys of ``SHORTHAND``),
    which is expanded into ``stages`` when the section is built. Frozen: a changed shorthand must
    be expanded again, so it goes through ``with_shorthand`` instead of an assignment that would
    silently leave the stages as they were."""

    NAME: ClassVar[str] = "tst"
    bag_size: int = setting(  # s: tokens averaged into one input position in phase 1 (1 = baseline)
        4, lambda v: v >= 1, "must be an integer >= 1 (1 = plain next-token baseline)")
    ratio: float = setting(  # r: fraction of steps in phase 1 (0 = baseline)
        0.3, lambda v: 0 <= v <= 1, "must be in [0, 1] (the fraction of steps in phase 1)")
    weighting: Weighting = "uniform"  # slot weighting of the multi-hot loss
    mode: Mode = "full"  # full TST, or an ablation: input (bagged inputs only) | output (bag targets only)
    # Research levers (docs/when-tst-pays.md); the defaults are the paper's method.
    curriculum: list = setting([])  # [[s, r], ...]: several phase-1 stages; replaces bag_size/ratio
    slot_weights: list = setting([])  # explicit slot weights (>= s floats); replaces weighting
    anneal_to_ntp: bool = False  # slot weights move linearly to next-token-only over each phase-1 stage
    blend_steps: int = setting(  # smooth switch: the last K phase-1 steps turn gradually into next-token steps
        0, lambda v: v >= 0, "must be >= 0")
    lr_scale: float = setting(1.0, lambda v: v > 0, "must be > 0")  # LR multiplier during phase 1
    reset_optimizer: bool = False  # clear AdamW's moments when next-token training starts
    rewarmup_steps: int = setting(0, lambda v: v >= 0, "must be >= 0")  # linear LR re-warmup over the first next-token steps
    # The keys above are the shorthand of this list; a run's config.toml records it expanded.
    stages: list = setting([])  # [[tst.stages]] tables (see below): the stages literally; empty = the shorthand's

    def check(self) -> None:
        for entry in self.curriculum:
            if not _curriculum_entry(entry):
                raise ConfigError(f"tst.curriculum entry {entry!r} must be [bag_size >= 2, ratio in (0, 1]]")
        if sum(entry[1] for entry in self.curriculum) > 1:
            raise ConfigError("tst.curriculum ratios must sum to at most 1")
        largest = max([self.bag_size] + [entry[0] for entry in self.curriculum])
        if self.slot_weights and not _slot_weights_ok(self.slot_weights, largest):
            raise ConfigError(f"tst.slot_weights must list >= {largest} non-negative numbers, the first positive")
        if not self.stages:
            object.__setattr__(self, "stages", self.shorthand_stages())
            return
        tables = [_stage_table(table, index) for index, table in enumerate(self.stages, 1)]
        object.__setattr__(self, "stages", tables)
        for index, table in enumerate(tables, 1):
            if table.open_ended and index < len(tables):
                raise ConfigError(f"tst.stages[{index}]: needs steps or fraction (only the last stage may run to the end "
                                  "without them)")
            if table.bag_size > 1 and any(t.bag_size == 1 for t in tables[: index - 1]):
                raise ConfigError(f"tst.stages[{index}]: a superposition stage after next-token training: phase 1 "
                                  "(bag_size > 1) comes first")
        defaults = TSTConfig()
        touched = [key for key in SHORTHAND if getattr(self, key) != getattr(defaults, key)]
        if touched and not self.written_as_shorthand:
            raise ConfigError(f"tst.stages is given, so tst.{touched[0]} (its shorthand) must not be set as well")

    def shorthand_stages(self) -> list[StageConfig]:
        """The shorthand's stages: one superposition stage of bag_size for a fraction ratio (or one
        per curriculum entry), then next-token prediction for the steps left."""
        plan = [tuple(entry) for entry in self.curriculum] or [(self.bag_size, self.ratio)]
        weighting = list(self.slot_weights) if self.slot_weights else self.weighting
        tables = [StageConfig(bag_size=s, fraction=float(r), mode=self.mode, weighting=weighting, anneal=self.anneal_to_ntp,
                              lr_scale=self.lr_scale) for s, r in plan if s > 1 and r > 0]
        if tables:
            tables[-1] = dataclasses.replace(tables[-1], blend_steps=self.blend_steps)
        return tables + [StageConfig(bag_size=1, rewarmup_steps=self.rewarmup_steps if tables else 0)]

    @property
    def written_as_shorthand(self) -> bool:
        """Are the stages those of the shorthand (given as the shorthand, or literally the same)?"""
        return self.stages == self.shorthand_stages()

    def with_shorthand(self, **changes) -> TSTConfig:
        """This section with other shorthand values, its stages expanded from them again."""
        return dataclasses.replace(self, **changes, stages=[])

    def to_dict(self) -> dict:
        """As written: the shorthand alone when the stages are its expansion, else with the stage list."""
        values = dataclasses.asdict(self)
        if self.written_as_shorthand:
            values["stages"] = []
        return values


def _curriculum_entry(entry) -> bool:
    return (isinstance(entry, list) and len(entry) == 2 and _integer(entry[0]) and entry[0] >= 2 and _number(entry[1])
            and 0 < entry[1] <= 1)


def _stage_table(table, index: int) -> StageConfig:
    """The ``index``-th [[tst.stages]] table (a dict from TOML, or a StageConfig), checked."""
    where = f"tst.stages[{index}]"
    if isinstance(table, StageConfig):
        return table
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table ([[tst.stages]] with bag_size = ...), got {table!r}")
    known = [f.name for f in dataclasses.fields(StageConfig)]
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]}; known: {', '.join(known)}")
    try:
        return StageConfig(**table)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


@dataclass
class OptimConfig(Section):
    NAME: ClassVar[str] = "optim"
    lr: float = setting(3e-3, lambda v: v > 0, "must be > 0")  # peak learning rate, reached after the warmup
    min_lr_ratio: float = setting(0.0, lambda v: 0 <= v <= 1, "must be in [0, 1]")  # the LR decays linearly to lr * min_lr_ratio
    warmup_steps: int = setting(50, lambda v: v >= 0, "must be >= 0")  # linear warmup from 0 over the first steps
    decay_fraction: float = setting(  # warmup-stable-decay: linear decay over the last fraction of steps
        0.1, lambda v: 0 <= v <= 1, "must be in [0, 1]")
    beta1: float = setting(0.9, lambda v: 0 <= v < 1, "must be in [0, 1)")  # AdamW first-moment decay
    beta2: float = setting(0.95, lambda v: 0 <= v < 1, "must be in [0, 1)")  # AdamW second-moment decay
    eps: float = setting(1e-8, lambda v: v > 0, "must be > 0")  # AdamW denominator epsilon
    weight_decay: float = setting(  # AdamW decoupled weight decay, on parameters with >= 2 dimensions only
        0.1, lambda v: v >= 0, "must be >= 0")
    grad_clip: float = setting(1.0, lambda v: v >= 0, "must be >= 0")  # max global grad norm (0 = no clipping)


@dataclass
class TrainConfig(Section):
    NAME: ClassVar[str] = "train"
    out_dir: str = "runs/tiny"  # the run directory (compare and sweep: the parent of one directory per arm)
    steps: int = setting(600, lambda v: v >= 1, "must be >= 1")  # optimizer steps in all, both phases included
    batch_size: int = setting(  # global batch, in samples (windows), over all ranks and micro-batches
        16, lambda v: v >= 1, "must be >= 1")
    micro_batch_size: int = setting(  # per rank and forward pass; 0 = the whole per-rank batch at once
        0, lambda v: v >= 0, "must be >= 0")
    seed: int = 0  # initial weights and data order (the windows of step t come from (seed, t))
    device: Literal["auto", "cpu", "cuda"] = "auto"  # the device of every rank
    threads: int = setting(  # CPU threads per process; 0 = the cores the load average leaves free (OMP_NUM_THREADS, if set,
        0, lambda v: v >= 0, "must be >= 0 (0 = chosen automatically)")  # stands)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU; bf16 is autocast, weights stay fp32
    compile: bool | str = setting(  # auto: on for CUDA, off for CPU; torch.compile each decoder block and the loss
        "auto", lambda v: v in ("auto", True, False), "must be auto, true or false")
    activation_checkpointing: Literal["none", "full", "selective"] = "none"  # recompute each block's activations in backward
    eval_every: int = setting(100, lambda v: v >= 1, "must be >= 1")  # validate every this many steps, and after the last one
    eval_tokens: int = setting(  # held-out tokens per validation (next-token loss); 0 = whole split
        65536, lambda v: v >= 0, "must be >= 0")
    log_every: int = setting(  # a train record in metrics.jsonl every this many steps, and after the last one
        10, lambda v: v >= 1, "must be >= 1")
    checkpoint_every: int = setting(200, lambda v: v >= 0, "must be >= 0")  # 0 = only at the end
    keep_checkpoints: int = setting(2, lambda v: v >= 1, "must be >= 1")  # the newest this many checkpoints are kept
    checkpoint_format: Literal["auto", "sharded", "gathered"] = "auto"  # auto: sharded (DCP) under FSDP/HSDP, else gathered
    async_checkpoint: bool = False  # sharded checkpoints are written in the background while training goes on
    max_bad_steps: int = setting(  # consecutive non-finite steps tolerated before the run stops
        5, lambda v: v >= 1, "must be >= 1")
    progress: bool = True  # tqdm progress bars (rank 0 only)
    tensorboard: bool = True  # TensorBoard scalars in out_dir/tensorboard (see superpose.tracking)
    wandb: bool = False  # also log to Weights & Biases (pip install 'superpose[wandb]')
    wandb_project: str = "superpose"  # W&B project of the run
    wandb_mode: Literal["online", "offline"] = "online"  # offline needs no account (upload later with `wandb sync`)

    def check(self) -> None:
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ConfigError(f"train.batch_size ({self.batch_size}) must be a multiple of "
                              f"train.micro_batch_size ({self.micro_batch_size})")
        if self.async_checkpoint and self.checkpoint_format == "gathered":
            raise ConfigError("train.async_checkpoint needs sharded checkpoints; set train.checkpoint_format = 'sharded' "
                              "(or 'auto' under FSDP/HSDP)")


@dataclass
class DistributedConfig(Section):
    NAME: ClassVar[str] = "distributed"
    strategy: Literal["ddp", "fsdp", "hsdp"] = "ddp"  # used when launched with torchrun and WORLD_SIZE > 1
    shard_size: int = 0  # hsdp: ranks per shard group (e.g. GPUs per node); the WORLD_SIZE / shard_size groups replicate
    param_dtype: Literal["fp32", "bf16"] = "fp32"  # fsdp/hsdp mixed precision (WORLD_SIZE > 1): dtype of gathered parameters
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # fsdp/hsdp mixed precision (WORLD_SIZE > 1): dtype of gradient reduction

    def check(self) -> None:
        if self.strategy == "ddp" and (self.param_dtype, self.reduce_dtype) != ("fp32", "fp32"):
            raise ConfigError("distributed.param_dtype/reduce_dtype apply to strategies fsdp and hsdp only; DDP keeps fp32 "
                              "(use train.precision=bf16)")
        if self.strategy != "hsdp" and self.shard_size:
            raise ConfigError("distributed.shard_size applies to strategy hsdp only; set distributed.strategy=hsdp or drop "
                              "shard_size")
        if self.strategy == "hsdp" and self.shard_size < 1:
            raise ConfigError("distributed.strategy = hsdp needs distributed.shard_size >= 1 (ranks per shard group, e.g. "
                              "GPUs per node)")


@dataclass
class Config:
    """The whole tree; built, it is checked (``validate`` checks it again after edits in place)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tst: TSTConfig = field(default_factory=TSTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """The rule across sections: the stage list covers train.steps."""
        tables, steps = self.tst.stages, self.train.steps
        covered = sum(t.fraction + t.steps / steps for t in tables)  # in units of train.steps
        if covered > 1 + 1e-9 or (not tables[-1].open_ended and covered < 1 - 0.5 / steps):
            raise ConfigError(f"tst.stages cover {covered * steps:g} of train.steps = {steps} steps; they must cover them all "
                              "(a last stage without steps or fraction runs to the end)")

    def to_dict(self) -> dict:
        return {f.name: (self.tst.to_dict() if f.name == "tst" else dataclasses.asdict(getattr(self, f.name)))
                for f in dataclasses.fields(self)}


def validate(cfg: Config) -> None:
    """Check ``cfg`` again (every section, then across them): for a config edited in place."""
    for f in dataclasses.fields(cfg):
        getattr(cfg, f.name).validate()
    cfg.check()


# Options of the commands that take no run config: the defaults of the CLI flags and of the
# library functions behind them (superpose.data.prepare, compare.sweep, generate, evaluation).


@dataclass
class PrepareOptions:
    vocab_size: int = DataConfig.vocab_size  # size of the byte-level BPE to train (without --tokenizer)
    text_field: str = "text"  # JSONL field or Parquet/Arrow column holding the text
    val_fraction: float = 0.05  # documents held out for validation when no --valid inputs are given
    seed: int = 0  # seed of the held-out document draw
    num_proc: int = 1  # > 1: tokenise in this many processes with Hugging Face datasets


def check_prepare_options(val_fraction: float, vocab_size: int, num_proc: int, tokenizer: str | None) -> None:
    """The checks of ``prepare``'s options, made by the CLI before torch loads and by ``prepare`` itself."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"the validation fraction must be in (0, 1), got {val_fraction}")
    if tokenizer is None and vocab_size <= 256:
        raise DataError(f"vocab size {vocab_size} is too small: a byte-level BPE needs more than 256 tokens")
    if num_proc < 1:
        raise DataError("num_proc must be >= 1")


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


def _build(layers: list[tuple[dict, str]]) -> Config:
    """A config from layers of ``{section: {key: value}}`` (later layers win), each named by its
    origin for the errors of unknown sections and keys; the sections check their values when built."""
    sections = {f.name: f.default_factory for f in dataclasses.fields(Config)}
    merged = {name: {} for name in sections}
    for values, origin in layers:
        for section, table in values.items():
            if section not in sections:
                raise ConfigError(f"unknown config section [{section}] in {origin}; known: {', '.join(sections)}")
            if not isinstance(table, dict):
                raise ConfigError(f"[{section}] in {origin} must be a table of keys")
            known = [f.name for f in dataclasses.fields(sections[section])]
            for key, value in table.items():
                if key not in known:
                    raise ConfigError(f"unknown config key {section}.{key} in {origin}; known: {', '.join(known)}")
                merged[section][key] = value
    return Config(**{name: cls(**merged[name]) for name, cls in sections.items()})


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
    layers = []
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory; give a TOML file (a run's config is RUN/config.toml)")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        layers.append((read_toml(path), str(path)))
    layers += [(parse_override(text), "command line") for text in overrides]
    return _build(layers)


def read_toml(path: Path) -> dict:
    """A TOML file as a dict (tomllib, or tomli before Python 3.11); a one-line error if it does not parse."""
    try:
        return tomllib.loads(Path(path).read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None


def config_from_dict(data: dict) -> Config:
    return _build([(data, "saved config")])
