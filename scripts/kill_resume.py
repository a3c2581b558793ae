"""Fault injection: SIGKILL a short TST run at many points, damage its checkpoints, resume it, and
compare it with an uninterrupted run.

    python scripts/kill_resume.py                       # long form: 50 trials (~1 h on 2 cores)
    python scripts/kill_resume.py --trials 1 --kills 0  # short form (CI): only the fixed kills of trial 0
    python scripts/kill_resume.py --format sharded      # the same with sharded (DCP) checkpoints

Each trial is one run directory, trained by a chain of processes: every process but the last is
killed with SIGKILL, the next one restarts with ``--resume auto``. Trials come in three kinds:
- ``superpose train`` (8 in 10): trial 0 always kills during the last phase-1 step, during the
  first phase-2 step, in the middle of writing a checkpoint and in the middle of the model
  export; every trial adds ``--kills``
  random kill points, and every odd trial a damage point: a kill once two checkpoints exist,
  after which the newest checkpoint is damaged (byte ranges flipped in place, truncated, its
  state file (sharded: its first shard file) or its manifest deleted, in turn). The next process must report the damage
  ("failed verification") and continue from the older checkpoint;
- ``superpose compare`` (trial 5, 15, ...): the baseline killed in phase 1, the process killed
  between the arms, the TST arm killed in phase 2 and while writing a checkpoint;
- a 2-rank DDP run under torchrun (trial 9, 19, ...): one rank SIGKILLed at two random steps
  (torchrun then tears the job down), resumed each time with 2 ranks.
A finished trial must have logged every step exactly once with the same loss, gradient norm,
learning rate and data position, the same validation losses, and exported bit-identical weights
as the uninterrupted reference run of its kind (on CPU: bit for bit). Prints
``damaged checkpoints=D detected=E``, then ``trials=N kills=K mismatches=M``.

Kill points (``--plan`` takes them comma-separated, for trial 0):
  step:K   inside step K (1-based), after its optimizer update, before it is logged or checkpointed
  ckpt:K   halfway through writing checkpoint K's model: its state file, or its first DCP tensor
           once trainer.pt is written (a partial hidden .tmp-step dir is left)
  final    after the last checkpoint, before the model export
  export   in the middle of the export: weights and tokenizer written, manifest and rename not
  ext:K    from outside, at whatever point the run has reached once step K shows in metrics.jsonl
  damage-KIND:K   step:K, then the newest checkpoint is damaged (KIND: flip truncate delstate delmanifest)
  between  (compare) once the baseline arm has finished, before the TST arm starts
  rank:K   (DDP) SIGKILL one worker once step K shows in metrics.jsonl
The in-process points are exact: the child process (this script with ``--child``) patches the
trainer to SIGKILL itself there; the library has no hooks for it.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from superpose.integrity import find_damage  # noqa: E402  (torch-free: the parent never imports torch)
from superpose.runs import STATE_FILE, checkpoint_dirs, checkpoint_step, logged_step, read_records  # noqa: E402

DAMAGE = ("flip", "truncate", "delstate", "delmanifest")
STEPS, RATIO, CHECKPOINT_EVERY, EVAL_EVERY = 24, 0.5, 4, 8
SWITCH = round(RATIO * STEPS)  # the first phase-2 step (0-based) = the last phase-1 step (1-based)
CONFIG = f"""
[model]
preset = "tiny"
[data]
corpus = ""
seq_len = 16
[tst]
bag_size = 4
ratio = {RATIO}
[optim]
warmup_steps = 4
[train]
steps = {STEPS}
batch_size = 4
seed = 1
device = "cpu"
eval_every = {EVAL_EVERY}
eval_tokens = 256
log_every = 1
checkpoint_every = {CHECKPOINT_EVERY}
keep_checkpoints = 2
progress = false
tensorboard = false
"""
COMPARED = {"train": ("stage", "bag_size", "loss", "lr", "grad_norm", "applied", "tokens_seen"),
            "eval": ("val_loss", "val_bpb", "tokens_seen"), "stage": ("stage", "bag_size", "mode"),
            "end": ("val_loss", "val_bpb", "tokens_seen")}


# ---------------------------------------------------------------------------- child process


def child(kill: str, argv: list[str]) -> None:
    """Run ``superpose`` with ``argv``, SIGKILLing this process at the kill point."""
    import torch

    import superpose.train as train_mod
    from superpose.cli import main

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    kind, _, arg = kill.partition(":")
    if kind == "step":
        write = train_mod.MetricsLog.write

        def write_or_die(self, record):
            if record["kind"] == "train" and record["step"] == int(arg):
                die()
            write(self, record)

        train_mod.MetricsLog.write = write_or_die
    elif kind == "ckpt":
        import superpose.checkpoint as checkpoint_mod

        save, torch_save, armed = checkpoint_mod.Checkpoints.save, torch.save, []

        def save_armed(self, step, *args, **kwargs):
            if step == int(arg):
                armed.append(step)
            return save(self, step, *args, **kwargs)

        def torch_save_half(obj, handle, *args, **kwargs):
            if not armed or not (isinstance(obj, torch.Tensor) or (isinstance(obj, dict) and "model" in obj)):  # not trainer.pt
                return torch_save(obj, handle, *args, **kwargs)
            buffer = io.BytesIO()
            torch_save(obj, buffer, *args, **kwargs)
            handle.write(buffer.getvalue()[: buffer.tell() // 2])
            handle.flush()
            die()

        checkpoint_mod.Checkpoints.save, torch.save = save_armed, torch_save_half
    elif kind == "final":
        train_mod.export_model = lambda *args, **kwargs: die()
    elif kind == "export":  # the weights and tokenizer are in .tmp-model, the manifest and rename are not
        import superpose.export as export_mod

        write_manifest = export_mod.write_manifest
        export_mod.write_manifest = lambda directory, *a: (die() if Path(directory).name == ".tmp-model"
                                                           else write_manifest(directory, *a))
    elif kind == "between":  # compare: the baseline arm has finished, the TST arm has not started
        import superpose.compare as compare_mod

        run_arm = compare_mod.run_arm
        compare_mod.run_arm = lambda cfg, label: die() if label.startswith("[2/2]") else run_arm(cfg, label)
    main(argv)


# ---------------------------------------------------------------------------- parent


def position(point: str) -> float:
    """Where in the run a kill point lies: step K, ext:K, rank:K and damage at K, checkpoint K just after, the export last."""
    kind, _, arg = point.partition(":")
    if kind in ("final", "export"):
        return STEPS + (0.75 if kind == "final" else 0.85)
    return int(arg) + (0.5 if kind == "ckpt" else 0.0)


def ordered(points: set[str]) -> list[str]:
    """Kill points in run order, each strictly after the one before (ext:K after a kill at K would
    fire at once on the killed process's log lines)."""
    plan = sorted(points, key=lambda p: (position(p), p))
    return [p for i, p in enumerate(plan) if i == 0 or position(p) > position(plan[i - 1])]


def random_points(rng: random.Random, count: int) -> set[str]:
    candidates = [f"step:{k}" for k in range(1, STEPS + 1)] + [f"ext:{k}" for k in range(1, STEPS + 1)]
    candidates += [f"ckpt:{k}" for k in range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY)] + ["final", "export"]
    return set(rng.sample(candidates, count))


def damage_point(rng: random.Random, trial: int) -> str:
    """A kill inside a step once two checkpoints exist, after which the newest one is damaged."""
    kind = DAMAGE[(trial // 2) % len(DAMAGE)]
    return f"damage-{kind}:{rng.randrange(2 * CHECKPOINT_EVERY + 1, STEPS + 1)}"


def damage(run_dir: Path, kind: str, rng: random.Random) -> str:
    """Damage the newest checkpoint as a bad disk or a careless hand would; returns what was done."""
    newest = checkpoint_dirs(run_dir)[-1]
    state = newest / STATE_FILE if (newest / STATE_FILE).is_file() else min(newest.glob("*.distcp"))  # gathered or sharded
    if kind == "flip":  # 1-3 byte ranges inverted in place: same size, other content
        raw = bytearray(state.read_bytes())
        ranges = [(start, rng.randrange(1, 4097)) for start in rng.sample(range(len(raw) - 4096), rng.randrange(1, 4))]
        for start, length in ranges:
            raw[start : start + length] = bytes(b ^ 0xFF for b in raw[start : start + length])
        state.write_bytes(bytes(raw))
        return f"{newest.name}: {len(ranges)} byte range(s) flipped"
    if kind == "truncate":
        size = rng.randrange(0, state.stat().st_size)
        os.truncate(state, size)
        return f"{newest.name}: {state.name} truncated to {size} bytes"
    target = state if kind == "delstate" else newest / "manifest.json"
    target.unlink()
    return f"{newest.name}: {target.name} deleted"


def command(trial: str, config: Path, run_dir: Path, kill: str) -> list[str]:
    """One process of a run: `superpose train|compare CONFIG --resume auto`, in the kill-point
    child (in-process kills) or under torchrun with 2 ranks (external kills only)."""
    if trial == "ddp":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "superpose",
                "train", str(config), f"--train.out_dir={run_dir}", "--resume", "auto"]
    argv = [trial, str(config), f"--train.out_dir={run_dir}"] + (["--resume", "auto"] if trial == "train" else [])
    inner = "none" if kill.startswith(("ext:", "rank:")) else kill
    return [sys.executable, __file__, "--child", inner, *argv]


def launch(cmd: list[str], run_dir: Path, kill: str, env: dict) -> subprocess.Popen:
    """Start one process, its output appended to RUN.log."""
    with open(run_dir.with_suffix(".log"), "a") as out:
        out.write(f"=== {kill}\n")
        out.flush()
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=out)


def run_segment(cmd: list[str], run_dir: Path, kill: str, env: dict) -> int:
    """One process of a trial; returns its exit status (-9 = killed; torchrun exits 1 when a rank was)."""
    proc = launch(cmd, run_dir, kill, env)
    kind, _, arg = kill.partition(":")
    if kind in ("ext", "rank"):
        while proc.poll() is None:
            if logged_step(run_dir) >= int(arg):
                os.kill(workers(proc.pid)[-1] if kind == "rank" else proc.pid, signal.SIGKILL)  # torchrun tears the rest down
                break
            time.sleep(0.005)
    return proc.wait()


def workers(pid: int) -> list[int]:
    """The superpose processes torchrun ``pid`` started (not its other helpers)."""
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [c for c in children if b"superpose" in Path(f"/proc/{c}/cmdline").read_bytes()]


def newest_checkpoint(run_dir: Path) -> int:
    """The step a resume would start from (checkpoints that verify, as the trainer sees them)."""
    return max((checkpoint_step(p) for p in checkpoint_dirs(run_dir) if find_damage(p) is None), default=0)


def records(run_dir: Path) -> list[tuple]:
    """The compared content of a run's metrics.jsonl, in order."""
    return [(r["kind"], r["step"], *(repr(r[k]) for k in COMPARED[r["kind"]]))
            for r in read_records(run_dir) if r["kind"] in COMPARED]


def weights_digest(run_dir: Path) -> str:
    files = sorted((run_dir / "model").glob("*.safetensors"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest() if files else "missing"


def compare(reference: Path, run_dir: Path, report) -> int:
    want, got = records(reference), records(run_dir)
    mismatches = sum(a != b for a, b in zip(want, got)) + abs(len(want) - len(got))
    for a, b in zip(want, got):
        if a != b:
            report(f"  reference {a}\n  resumed   {b}")
    if len(want) != len(got):
        report(f"  {len(want)} records in the reference, {len(got)} in the resumed run")
    if weights_digest(reference) != weights_digest(run_dir):
        report("  exported weights differ")
        mismatches += 1
    return mismatches


def prepare_data(work: Path) -> Path:
    """A small prepared corpus: three Shakespeare plays, 512-token BPE (about a second)."""
    from superpose.corpus import shakespeare_files
    from superpose.data import prepare  # imports torch: only when no --data is given

    data = work / "data"
    if not (data / "meta.json").exists():
        prepare(data, inputs=[str(p) for p in shakespeare_files()[:3]], vocab_size=512, progress=False)
    return data


def trial_kind(index: int) -> str:
    """Most trials kill `superpose train`; every tenth a `compare` (5th) and a 2-rank DDP run (10th)."""
    return {5: "compare", 9: "ddp"}.get(index % 10, "train")


def plan_of(kind: str, index: int, fixed: list[str], args, rng: random.Random) -> list[str]:
    if kind == "compare":  # baseline killed in phase 1, between the arms, TST in phase 2 and mid-checkpoint
        return [f"step:{SWITCH}", "between", f"step:{SWITCH + 1}", f"ckpt:{SWITCH + CHECKPOINT_EVERY}"]
    if kind == "ddp":  # one rank SIGKILLed at two random steps
        return ordered({f"rank:{k}" for k in rng.sample(range(1, STEPS), 2)})
    points = set(fixed if index == 0 else []) | random_points(rng, args.kills)
    return ordered(points | ({damage_point(rng, index)} if index % 2 else set()))


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--kills", type=int, default=3, help="random kill points per train trial (trial 0 adds its fixed ones)")
    parser.add_argument("--plan", help="kill points of trial 0 instead of the fixed ones, e.g. step:5,ckpt:8,final")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", help="a prepared data directory (default: prepare a small one in --work)")
    parser.add_argument("--work", default="/tmp/superpose-kill-resume", help="scratch directory (emptied first)")
    parser.add_argument("--format", default="auto", choices=["auto", "sharded", "gathered"], help="train.checkpoint_format")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = Path(args.data) if args.data else prepare_data(work)
    config = work / "config.toml"
    config.write_text(CONFIG.replace('corpus = ""', f'dir = "{data}"\ncorpus = ""') + f'checkpoint_format = "{args.format}"\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    say = (lambda text: print(text, file=sys.stderr)) if args.verbose else (lambda text: None)
    problems = []

    kinds = sorted({trial_kind(i) for i in range(args.trials)})
    references = {kind: launch(command(kind, config, work / f"reference-{kind}", "none"), work / f"reference-{kind}", "none", env)
                  for kind in kinds}  # alongside the trials: each process uses one thread
    fixed = (args.plan.split(",") if args.plan
             else [f"step:{SWITCH}", f"step:{SWITCH + 1}", f"ckpt:{SWITCH + CHECKPOINT_EVERY}", "export"])
    rng = random.Random(args.seed)
    kills = mismatches = damaged = detected = 0
    for trial in range(args.trials):
        kind = trial_kind(trial)
        plan = plan_of(kind, trial, fixed, args, rng)
        run_dir = work / f"trial-{trial:02d}"
        say(f"trial {trial} ({kind}): {', '.join(plan) or 'no kills'}")
        pending = None  # what was damaged, until the next process has reported it
        for point in plan + ["none"]:
            kill = "step:" + point.partition(":")[2] if point.startswith("damage-") else point
            if (kind == "train" and point not in ("none", "final", "export")
                    and newest_checkpoint(run_dir) >= int(point.partition(":")[2])):
                say(f"  {point}: skipped, an external kill came late and the run is already past it")
                continue
            log = run_dir.with_suffix(".log")
            seen = log.stat().st_size if log.exists() else 0
            status = run_segment(command(kind, config, run_dir, kill), run_dir, point, env)
            if pending is not None:
                noticed = "failed verification" in log.read_text()[seen:]
                detected += noticed
                if not noticed:
                    problems.append(f"trial {trial}: the damage ({pending}) went unnoticed")
                pending = None
            if point == "none":
                if status != 0:
                    problems.append(f"trial {trial}: the final resume failed (exit status {status})")
                break
            if status == -signal.SIGKILL or (kind == "ddp" and status != 0):
                kills += 1
                tmp = run_dir / "checkpoints" / f".tmp-step-{int(point[5:]):08d}" if point.startswith("ckpt:") else None
                if tmp is not None and kind == "train" and not (tmp.is_dir() and any(tmp.iterdir())):  # a partial file
                    problems.append(f"trial {trial}: {point} left no partial {tmp}")
                if point.startswith("damage-"):
                    pending = damage(run_dir, point[7:].partition(":")[0], rng)
                    damaged += 1
                    say(f"  damaged {pending}")
            elif not point.startswith(("ext:", "rank:")):  # an external kill may come too late; an in-process one may not
                problems.append(f"trial {trial}: {point} was not reached (exit status {status})")
        if status != 0:
            continue
        leftovers = [p for p in run_dir.rglob(".tmp-*")]
        if leftovers:
            problems.append(f"trial {trial}: partial directories were left behind: {leftovers}")
        reference = work / f"reference-{kind}"
        if references[kind].wait() != 0:
            print(f"the reference run failed; see {reference.with_suffix('.log')}", file=sys.stderr)
            return 1
        arms = ["baseline", "tst"] if kind == "compare" else [""]
        mismatches += sum(compare(reference / arm, run_dir / arm, say) for arm in arms)
    for problem_text in problems:
        print(problem_text, file=sys.stderr)
    if problems:
        print(f"process output: {work}/*.log", file=sys.stderr)
    print(f"damaged checkpoints={damaged} detected={detected}")
    print(f"trials={args.trials} kills={kills} mismatches={mismatches}")
    return 0 if mismatches == 0 and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
