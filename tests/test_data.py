"""Data: prepare (JSONL, text, an existing tokenizer), the window loader and the validation windows."""
import gzip
import json

import numpy as np
import torch
from conftest import SHARED_DATA

from superpose.data import TokenData, WindowLoader, prepare, validation_windows

GPT2 = str(SHARED_DATA / "tokenizers" / "gpt2")


def test_prepare_jsonl_and_text_with_an_existing_tokenizer(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with gzip.open(src / "a.jsonl.gz", "wt") as handle:
        for i in range(6):
            handle.write(json.dumps({"text": f"Document number {i}. " * 20, "title": str(i)}) + "\n")
    (src / "b.txt").write_text("A plain text file with one document.\n" * 10)
    meta = prepare(tmp_path / "out", inputs=[str(src)], tokenizer=GPT2, val_fraction=0.3, progress=False)
    data = TokenData(tmp_path / "out")
    assert meta["vocab_size"] == 50257 and meta["dtype"] == "uint16" and data.eos_id == 50256
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 7
    train_tokens = np.concatenate([np.asarray(s) for s in data.splits["train"]])
    assert (train_tokens == 50256).sum() == meta["splits"]["train"]["documents"]  # one EOS per document
    assert data.tokens("train") == meta["splits"]["train"]["tokens"]
    text = data.tokenizer().decode(train_tokens[: int(np.argmax(train_tokens == 50256))].tolist())
    assert text.startswith(("Document number", "A plain text"))


def test_window_loader_is_seeded_per_step_and_ranks_partition_the_batch(small_data):
    shards = TokenData(small_data).splits["train"]
    whole = WindowLoader(shards, 8, seed=3).batch(5, 17)
    assert whole.shape == (8, 17)
    halves = [WindowLoader(shards, 8, seed=3, rank=r, world=2).batch(5, 17) for r in range(2)]
    assert (np.concatenate(halves) == whole.numpy()).all()
    loader = WindowLoader(shards, 8, seed=3)
    first = loader.batch(0, 17)
    assert loader.state_dict() == {"tokens_seen": 8 * 17}
    other = WindowLoader(shards, 8, seed=3)
    other.load_state_dict(loader.state_dict())
    assert (other.batch(1, 17) == loader.batch(1, 17)).all() and not (loader.batch(2, 17) == first).all()
    flat = np.concatenate([np.asarray(s) for s in shards])
    row = whole[0].numpy()
    starts = np.flatnonzero(flat[: flat.size - 16] == row[0])
    assert any((flat[s : s + 17] == row).all() for s in starts)  # a window is contiguous text


def test_validation_windows_cover_each_target_once(small_data):
    val = TokenData(small_data).splits["val"]
    windows = validation_windows(val, 32, 0)
    assert windows.shape[1] == 33
    assert (windows[1:, 0] == windows[:-1, -1]).all()  # stride L: window i+1 starts where i's targets end
    assert validation_windows(val, 32, 320).shape[0] == 10


def test_llama3_style_tokenizer_ends_documents_with_end_of_text(tmp_path):
    """Llama 3's tokenizer (the paper's) has <|end_of_text|>, not <|endoftext|>: prepare, the data
    check and the exported tokenizer all use it, and the vocabulary keeps its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    from superpose.distributed import Runtime
    from superpose.export import export_model
    from superpose.model import TSTModel, build_model

    texts = [f"Document number {i}: the quick brown fox jumps over the lazy dog." for i in range(20)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    end = tok.token_to_id("<|end_of_text|>")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    meta = prepare(tmp_path / "out", inputs=[str(tmp_path / "docs.jsonl")], tokenizer=str(tmp_path / "tokenizer.json"),
                   val_fraction=0.3, progress=False)
    data = TokenData(tmp_path / "out")
    assert meta["eos_id"] == data.eos_id == end and meta["vocab_size"] == tok.get_vocab_size()
    train_tokens = np.concatenate([np.asarray(s) for s in data.splits["train"]])
    assert (train_tokens == end).sum() == meta["splits"]["train"]["documents"]

    lm = build_model("tiny", data.vocab_size, 32)
    export_model(TSTModel(lm), lm, data.tokenizer(), data.eos_id, tmp_path / "model", {}, Runtime(0, 1, torch.device("cpu")))
    exported = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert exported.eos_token == "<|end_of_text|>" and exported.eos_token_id == end and len(exported) == data.vocab_size
