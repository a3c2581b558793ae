"""Fault injection: SIGKILL a short TST run at many points, resume it, compare with an uninterrupted run.

    python scripts/kill_resume.py                       # long form: 10 trials, 3 random kills each
    python scripts/kill_resume.py --trials 1 --kills 0  # short form (CI): only the fixed kills of trial 0

Each trial is one run directory, trained by a chain of processes: every process but the last is
killed with SIGKILL, the next one restarts with ``superpose train --resume auto``. Trial 0 always
kills during the last phase-1 step, during the first phase-2 step and in the middle of writing a
checkpoint; every trial adds ``--kills`` random kill points. A finished trial must have logged
every step exactly once with the same loss, gradient norm, learning rate and data position, the
same validation losses, and exported bit-identical weights as the uninterrupted reference run
(single process on CPU: bit for bit). Prints one line: ``trials=N kills=K mismatches=M``.

Kill points (``--plan`` takes them comma-separated):
  step:K   inside step K (1-based), after its optimizer update, before it is logged or checkpointed
  ckpt:K   halfway through writing checkpoint K's state file (a partial hidden .tmp-step dir is left)
  final    after the last checkpoint, before the model export
  ext:K    from outside, at whatever point the run has reached once step K shows in metrics.jsonl
The first three are exact: the child process (this script with ``--child``) patches the trainer
to SIGKILL itself there; the library has no hooks for it.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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
    sys.path.insert(0, str(ROOT))
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
        save_checkpoint, torch_save, armed = train_mod.save_checkpoint, torch.save, []

        def save_checkpoint_armed(run_dir, step, *args, **kwargs):
            if step == int(arg):
                armed.append(step)
            return save_checkpoint(run_dir, step, *args, **kwargs)

        def torch_save_half(obj, handle, *args, **kwargs):
            if not armed:
                return torch_save(obj, handle, *args, **kwargs)
            buffer = io.BytesIO()
            torch_save(obj, buffer, *args, **kwargs)
            handle.write(buffer.getvalue()[: buffer.tell() // 2])
            handle.flush()
            die()

        train_mod.save_checkpoint, torch.save = save_checkpoint_armed, torch_save_half
    elif kind == "final":
        train_mod.export_model = lambda *args, **kwargs: die()
    main(argv)


# ---------------------------------------------------------------------------- parent


def position(point: str) -> float:
    """Where in the run a kill point lies: step K and ext:K at K, checkpoint K just after, final last."""
    kind, _, arg = point.partition(":")
    return STEPS + 0.75 if kind == "final" else int(arg) + (0.5 if kind == "ckpt" else 0.0)


def ordered(points: set[str]) -> list[str]:
    """Kill points in run order, each strictly after the one before (ext:K after a kill at K would
    fire at once on the killed process's log lines)."""
    plan = sorted(points, key=lambda p: (position(p), p))
    return [p for i, p in enumerate(plan) if i == 0 or position(p) > position(plan[i - 1])]


def random_points(rng: random.Random, count: int) -> set[str]:
    candidates = [f"step:{k}" for k in range(1, STEPS + 1)] + [f"ext:{k}" for k in range(1, STEPS + 1)]
    candidates += [f"ckpt:{k}" for k in range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY)] + ["final"]
    return set(rng.sample(candidates, count))


def launch(config: Path, run_dir: Path, kill: str, env: dict) -> subprocess.Popen:
    """Start one process of a run (``superpose train --resume auto``), output appended to RUN.log."""
    argv = ["train", str(config), f"--train.out_dir={run_dir}", "--resume", "auto"]
    inner = "none" if kill.startswith("ext:") else kill
    with open(run_dir.with_suffix(".log"), "a") as out:
        out.write(f"=== {kill}\n")
        out.flush()
        return subprocess.Popen([sys.executable, __file__, "--child", inner, *argv], env=env, cwd=ROOT, stdout=out, stderr=out)


def run_segment(config: Path, run_dir: Path, kill: str, env: dict) -> int:
    """One process of a trial; returns its exit status (-9 = killed)."""
    proc = launch(config, run_dir, kill, env)
    if kill.startswith("ext:"):
        target = int(kill.partition(":")[2])
        while proc.poll() is None:
            if logged_step(run_dir / "metrics.jsonl") >= target:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    return proc.wait()


def logged_step(path: Path) -> int:
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "train":
            steps.append(record["step"])
    return max(steps)


def newest_checkpoint(run_dir: Path) -> int:
    """The step a resume would start from (complete checkpoints only, as the trainer sees them)."""
    steps = [int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*/state.pt")]
    return max(steps, default=0)


def records(run_dir: Path) -> list[tuple]:
    """The compared content of a run's metrics.jsonl, in order."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] in COMPARED:
            rows.append((record["kind"], record["step"], *(repr(record[k]) for k in COMPARED[record["kind"]])))
    return rows


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
    sys.path.insert(0, str(ROOT))
    from superpose.data import prepare, shakespeare_files

    data = work / "data"
    if not (data / "meta.json").exists():
        prepare(data, inputs=[str(p) for p in shakespeare_files()[:3]], vocab_size=512, progress=False)
    return data


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--kills", type=int, default=3, help="random kill points per trial (trial 0 adds its fixed ones)")
    parser.add_argument("--plan", help="kill points of trial 0 instead of the fixed ones, e.g. step:5,ckpt:8,final")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", help="a prepared data directory (default: prepare a small one in --work)")
    parser.add_argument("--work", default="/tmp/superpose-kill-resume", help="scratch directory (emptied first)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = Path(args.data) if args.data else prepare_data(work)
    config = work / "config.toml"
    config.write_text(CONFIG.replace('corpus = ""', f'dir = "{data}"\ncorpus = ""'))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    say = (lambda text: print(text, file=sys.stderr)) if args.verbose else (lambda text: None)
    problems = []

    reference = work / "reference"
    reference_proc = launch(config, reference, "none", env)  # alongside trial 0: each process uses one thread
    fixed = args.plan.split(",") if args.plan else [f"step:{SWITCH}", f"step:{SWITCH + 1}", f"ckpt:{SWITCH + CHECKPOINT_EVERY}"]
    rng = random.Random(args.seed)
    kills = mismatches = 0
    for trial in range(args.trials):
        plan = ordered(set(fixed if trial == 0 else []) | random_points(rng, args.kills))
        run_dir = work / f"trial-{trial:02d}"
        say(f"trial {trial}: {', '.join(plan) or 'no kills'}")
        for point in plan:
            if point != "final" and newest_checkpoint(run_dir) >= int(point.partition(":")[2]):
                say(f"  {point}: skipped, an external kill came late and the run is already past it")
                continue
            status = run_segment(config, run_dir, point, env)
            if status == -signal.SIGKILL:
                kills += 1
                tmp = run_dir / "checkpoints" / f".tmp-step-{int(point[5:]):08d}" if point.startswith("ckpt:") else None
                if tmp is not None and not (tmp / "state.pt").is_file():
                    problems.append(f"trial {trial}: {point} left no partial {tmp}")
            elif not point.startswith("ext:"):  # an external kill may come too late; an in-process one may not
                problems.append(f"trial {trial}: {point} was not reached (exit status {status})")
        if run_segment(config, run_dir, "none", env) != 0:
            problems.append(f"trial {trial}: the final resume failed")
            continue
        if list((run_dir / "checkpoints").glob(".tmp-*")):
            problems.append(f"trial {trial}: a partial checkpoint directory was left behind")
        if reference_proc.wait() != 0:
            print(f"the reference run failed; see {reference.with_suffix('.log')}", file=sys.stderr)
            return 1
        mismatches += compare(reference, run_dir, say)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"process output: {work}/*.log", file=sys.stderr)
    print(f"trials={args.trials} kills={kills} mismatches={mismatches}")
    return 0 if mismatches == 0 and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
