"""`prepare` through Hugging Face datasets: the same shards as the plain reader, from Parquet/Arrow."""
import json

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq

from superpose.cli import main
from superpose.corpus import shakespeare_files
from superpose.data import DataError, TokenData, prepare


@pytest.fixture(scope="module")
def docs():
    """~200 scene-sized documents, some blank (both readers drop those)."""
    texts = [p.read_text() for p in shakespeare_files()[:2]]
    return [chunk for text in texts for chunk in text.split("\n\n\n")][:200] + ["   ", ""]


def shards(directory):
    data = TokenData(directory)
    return {split: np.concatenate([np.asarray(s) for s in data.splits[split]]) for split in ("train", "val")}


def test_parquet_in_parallel_matches_the_plain_jsonl_reader(docs, tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    plain = prepare(tmp_path / "plain", inputs=[str(jsonl)], text_field="body", vocab_size=400, progress=False)
    table = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": list(range(len(docs))), "body": docs}), table)
    main(["prepare", "--out", str(tmp_path / "hf"), "--input", str(table), "--text-column", "body",
          "--tokenizer", str(tmp_path / "plain" / "tokenizer.json"), "--num-proc", "2", "--quiet"])
    meta = json.loads((tmp_path / "hf" / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == sum(bool(d.strip()) for d in docs)
    for split in ("train", "val"):
        for key in ("tokens", "bytes", "documents"):
            assert meta["splits"][split][key] == plain["splits"][split][key]
    expected, got = shards(tmp_path / "plain"), shards(tmp_path / "hf")
    for split in ("train", "val"):
        np.testing.assert_array_equal(got[split], expected[split])
    assert not list((tmp_path / "hf").glob(".datasets-cache-*"))  # the datasets cache is removed


def test_arrow_file_and_validation_inputs(docs, tmp_path):
    dataset = datasets.Dataset.from_dict({"text": docs})
    dataset.save_to_disk(str(tmp_path / "saved"))
    [arrow] = (tmp_path / "saved").glob("*.arrow")
    valid = tmp_path / "valid.jsonl"
    valid.write_text(json.dumps({"text": docs[0]}) + "\n")
    meta = prepare(tmp_path / "out", inputs=[str(arrow)], valid_inputs=[str(valid)], vocab_size=300, progress=False)
    assert meta["splits"]["train"]["documents"] == sum(bool(d.strip()) for d in docs)
    assert meta["splits"]["val"]["documents"] == 1
    assert TokenData(tmp_path / "out").tokens("train") == meta["splits"]["train"]["tokens"]


def test_missing_or_non_text_column_is_a_clear_error(docs, tmp_path):
    table = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": docs, "n": list(range(len(docs)))}), table)
    with pytest.raises(DataError, match="no column 'text'.*body"):
        prepare(tmp_path / "a", inputs=[str(table)], progress=False)
    with pytest.raises(DataError, match="column 'n' holds"):
        prepare(tmp_path / "b", inputs=[str(table)], text_field="n", progress=False)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot be read as parquet"):
        prepare(tmp_path / "c", inputs=[str(broken)], progress=False)
