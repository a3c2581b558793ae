"""The paper-shape plan's data on a GPU machine: a prepared data directory, its token shards carried xz-compressed.

The larger corpus (../shared/tools/make_large_corpus.py: ~150 MB of Gutenberg text, ~42M tokens with
the map's 8k BPE) is prepared here with the map's own tokenizer, so that CPU and GPU points share a
vocabulary, then packed into an ignored folder of the working tree that travels with a device call:

    python3 ../shared/tools/make_large_corpus.py GIT_DIR /tmp/large-corpus
    python -m superpose prepare --input '/tmp/large-corpus/train-*.jsonl.gz' \\
        --valid ../shared/data/gutenberg/valid-00000.jsonl.gz --tokenizer /tmp/regime-gut/tokenizer.json --out /tmp/paper-data
    python scripts/paper_data.py pack /tmp/paper-data .paper-data
    python3 scripts/paper_data.py unpack .paper-data /tmp/paper-data     # on the device, before the plan

Why shards and not text: xz-compressed uint16 token shards are about a third smaller than the gzipped
text they come from (12.4 MB against 18.9 MB for the shared 13.5M-token set), which is what lets the
corpus fit the device's 64 MiB transfer beside the project, and unpacking takes seconds where
tokenising the text there would take longer (docs/when-tst-pays.md has both measurements). Every shard
is checked against the SHA-256 recorded when it was packed and against the token count in meta.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from superpose.errors import DataError  # noqa: E402
from superpose.files import atomic_write_text  # noqa: E402

MANIFEST = "manifest.json"
CHUNK = 1 << 22  # bytes per read


def shard_files(meta: dict) -> list[str]:
    return [shard["file"] for split in meta["splits"].values() for shard in split["shards"]]


def pack(src: Path, dst: Path) -> None:
    """``dst``: meta.json, the tokenizer, each shard as ``FILE.xz`` and a manifest of the shards' SHA-256."""
    meta = json.loads((src / "meta.json").read_text())
    dst.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name in shard_files(meta):
        tmp = dst / f".{name}.xz.tmp"
        digest = hashlib.sha256()
        with open(src / name, "rb") as plain, lzma.open(tmp, "wb", preset=6) as packed:
            while chunk := plain.read(CHUNK):
                digest.update(chunk)
                packed.write(chunk)
        tmp.replace(dst / f"{name}.xz")
        digests[name] = digest.hexdigest()
    for name in ("meta.json", meta["tokenizer"]):
        shutil.copyfile(src / name, dst / name)
    atomic_write_text(dst / MANIFEST, json.dumps({"sha256": digests}, indent=1))
    size = sum(p.stat().st_size for p in dst.iterdir())
    print(f"packed {src} into {dst}: {len(digests)} shards, {size / 1e6:.1f} MB")


def unpack(src: Path, dst: Path) -> None:
    """A prepared data directory from ``pack``'s folder, every shard verified (hash and token count)."""
    meta = json.loads((src / "meta.json").read_text())
    digests = json.loads((src / MANIFEST).read_text())["sha256"]
    itemsize = {"uint16": 2, "uint32": 4}[meta["dtype"]]
    dst.mkdir(parents=True, exist_ok=True)
    for split in meta["splits"].values():
        for shard in split["shards"]:
            name, tmp, digest, size = shard["file"], dst / f".{shard['file']}.tmp", hashlib.sha256(), 0
            with lzma.open(src / f"{name}.xz", "rb") as packed, open(tmp, "wb") as plain:
                while chunk := packed.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    plain.write(chunk)
            if digest.hexdigest() != digests.get(name) or size != shard["tokens"] * itemsize:
                tmp.unlink()
                raise DataError(f"{src / name}.xz does not unpack to the shard that was packed "
                                f"({size} bytes for {shard['tokens']} tokens, or another SHA-256): pack it again")
            tmp.replace(dst / name)
    shutil.copyfile(src / meta["tokenizer"], dst / meta["tokenizer"])
    atomic_write_text(dst / "meta.json", (src / "meta.json").read_text())  # last: the directory is complete
    print(f"unpacked {src} into {dst}: {meta['splits']['train']['tokens']:,} train tokens, "
          f"{meta['splits']['val']['tokens']:,} val tokens")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["pack", "unpack"])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    args = p.parse_args()
    try:
        (pack if args.action == "pack" else unpack)(args.src, args.dst)
    except (DataError, OSError, KeyError, ValueError, lzma.LZMAError) as err:
        sys.exit(f"paper_data {args.action}: {type(err).__name__}: {err}")


if __name__ == "__main__":
    main()
