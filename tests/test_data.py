"""Data pipeline: tokenizers, synthetic corpora, JSONL -> .bin/.idx, blends, micro-batches."""

from __future__ import annotations

import filecmp
import gzip
import json
import multiprocessing
import os
import re
import time
from pathlib import Path

import numpy
import pytest
import torch

from megatron_llamapro.data import synthetic
from megatron_llamapro.data.blend import (DataSpecError, MicroBatchIterator, build_datasets,
                                          parse_data_path, parse_valid_data)
from megatron_llamapro.data.indexed import (BadInputError, PreprocessConfig, document_prefix,
                                            preprocess)
from megatron_llamapro.data.tokenizer import TokenizerError, build_tokenizer, tokenizer_files
from tests.lib import run_tool

SEQ = 32


# --- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def corpora() -> dict[str, list[str]]:
    return {"general": synthetic.general_corpus(400, seed=1),
            "domain": synthetic.domain_corpus(400, seed=1)}


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, corpora) -> Path:
    out = tmp_path_factory.mktemp("sp")
    return synthetic.train_sentencepiece(corpora["general"] + corpora["domain"], 600, out)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, corpora) -> Path:
    out = tmp_path_factory.mktemp("hf")
    return synthetic.train_hf_bpe(corpora["general"] + corpora["domain"], 500, out)


@pytest.fixture(scope="session")
def sp_tokenizer(sp_model):
    return build_tokenizer("sentencepiece", sp_model)


@pytest.fixture(scope="session")
def prefixes(tmp_path_factory, corpora, sp_model) -> dict[str, str]:
    """general/domain corpora preprocessed with the sentencepiece tokenizer (EOD appended)."""
    out = tmp_path_factory.mktemp("indexed")
    result = {}
    for name, texts in corpora.items():
        jsonl = synthetic.write_jsonl(texts, out / f"{name}.jsonl")
        preprocess(PreprocessConfig([jsonl], out / name, "sentencepiece", sp_model,
                                    append_eod=True))
        result[name] = document_prefix(out / name, "text")
    return result


def read_documents(prefix: str, tokenizer, strip_eod: bool) -> list[str]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    texts = []
    for i in range(len(dataset)):
        ids = dataset[i].tolist()
        if strip_eod:
            assert ids[-1] == tokenizer.eod
            ids = ids[:-1]
        texts.append(tokenizer.detokenize(ids))
    return texts


def is_general(text: str) -> bool:
    return not re.search(r"[0-9=]", text)


# --- synthetic corpora ---------------------------------------------------------------------

def test_synthetic_corpora_are_deterministic_fast_and_distinct():
    start = time.perf_counter()
    general = synthetic.general_corpus(3000, seed=3)
    domain = synthetic.domain_corpus(3000, seed=3)
    assert time.perf_counter() - start < 2.0
    assert general == synthetic.general_corpus(3000, seed=3)
    assert domain == synthetic.domain_corpus(3000, seed=3)
    assert general != synthetic.general_corpus(3000, seed=4)
    assert len(set(general)) > 2900 and len(set(domain)) > 2900
    assert all(is_general(text) for text in general)
    assert not any(is_general(text) for text in domain)
    # domain answers are correct: every "a op b = c" line checks out
    for line in "\n".join(domain[:200]).splitlines():
        match = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (-?\d+)", line)
        if match:
            a, op, b, c = match.groups()
            assert eval(f"{a}{op}{b}") == int(c)  # noqa: S307 - digits and an operator only


def test_write_jsonl_gz(tmp_path):
    path = synthetic.write_jsonl(["a", "b\nc"], tmp_path / "x.jsonl.gz", key="body")
    with gzip.open(path, "rt") as stream:
        assert [json.loads(line)["body"] for line in stream] == ["a", "b\nc"]


# --- tokenizers ----------------------------------------------------------------------------

def test_sentencepiece_tokenizer(sp_tokenizer, sp_model, corpora):
    tok = sp_tokenizer
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.eod) == (0, 1, 2, 2)
    assert tok.vocab_size == 600 and len(tok.vocab) == 600
    assert tok.pad == -1 and tok.pad_id == tok.eos_id  # no pad piece: megatron sentinel / eos fill
    for text in corpora["general"][:50] + corpora["domain"][:50] + ["  two  spaces\n\ttab"]:
        ids = tok.tokenize(text)
        assert ids and ids[0] != tok.bos_id and ids[-1] != tok.eos_id
        assert tok.detokenize(ids) == text
    assert tokenizer_files("sentencepiece", sp_model) == [sp_model]
    # cache identity follows the file contents, not its location
    assert build_tokenizer("sentencepiece", sp_model).unique_identifiers == tok.unique_identifiers


def test_hf_tokenizer_from_dir_and_file(hf_dir, corpora):
    for source in (hf_dir, hf_dir / "tokenizer.json"):
        tok = build_tokenizer("hf", source)
        assert tok.bos_id == tok.vocab["<|begin_of_text|>"]
        assert tok.eos_id == tok.eod == tok.vocab["<|end_of_text|>"]
        assert tok.pad == -1 and tok.pad_id == tok.eos_id
        assert tok.vocab_size == 500
        text = corpora["domain"][0]
        ids = tok.tokenize(text)
        assert tok.bos_id not in ids and tok.detokenize(ids) == text
    assert tokenizer_files("hf", hf_dir) == [hf_dir / "tokenizer.json",
                                             hf_dir / "tokenizer_config.json"]


def test_tokenizer_errors(tmp_path, sp_model):
    with pytest.raises(TokenizerError, match="unknown tokenizer type 'gpt2'"):
        build_tokenizer("gpt2", sp_model)
    with pytest.raises(TokenizerError, match="not found"):
        build_tokenizer("hf", tmp_path)
    with pytest.raises(TokenizerError, match="not found"):
        build_tokenizer("sentencepiece", tmp_path / "missing.model")


# --- preprocessing -------------------------------------------------------------------------

def test_cli_round_trip_sentencepiece_gz_and_multiple_files(tmp_path, corpora, sp_model,
                                                            sp_tokenizer):
    first, second = corpora["general"][:150], corpora["domain"][:150]
    a = synthetic.write_jsonl(first, tmp_path / "a.jsonl")
    b = synthetic.write_jsonl(second, tmp_path / "b.jsonl.gz")
    result = run_tool("preprocess_data", "--input", str(a), str(b), "--json-key", "text",
                      "--tokenizer-type", "sentencepiece", "--tokenizer-model", str(sp_model),
                      "--output-prefix", str(tmp_path / "out"), "--workers", "2", "--append-eod", timeout=120)
    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("300 docs") and "tokens/s" in summary[0]
    prefix = str(tmp_path / "out_text_document")
    assert read_documents(prefix, sp_tokenizer, strip_eod=True) == first + second
    assert numpy.fromfile(prefix + ".bin", dtype=numpy.uint16).size == int(
        re.search(r"(\d+) tokens,", summary[0]).group(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.jsonl", "b.jsonl.gz", "out_text_document.bin", "out_text_document.idx"]


def test_round_trip_hf(tmp_path, corpora, hf_dir):
    texts = corpora["domain"][:100] + corpora["general"][:100]
    jsonl = synthetic.write_jsonl(texts, tmp_path / "in.jsonl", key="content")
    stats = preprocess(PreprocessConfig([jsonl], tmp_path / "hf", "hf", hf_dir,
                                        json_key="content"))
    assert stats.documents == 200 and stats.bad_lines == 0
    assert stats.output_prefix == str(tmp_path / "hf_content_document")
    assert read_documents(stats.output_prefix, build_tokenizer("hf", hf_dir),
                          strip_eod=False) == texts


def test_workers_give_identical_bytes(tmp_path, sp_model):
    texts = synthetic.general_corpus(700, seed=9) + synthetic.domain_corpus(700, seed=9)
    jsonl = synthetic.write_jsonl(texts, tmp_path / "in.jsonl")  # several 256-line tasks
    outputs = []
    for workers in (1, 2):
        stats = preprocess(PreprocessConfig([jsonl], tmp_path / f"w{workers}", "sentencepiece",
                                            sp_model, workers=workers, append_eod=True))
        outputs.append(stats.output_prefix)
    for suffix in (".bin", ".idx"):
        assert filecmp.cmp(outputs[0] + suffix, outputs[1] + suffix, shallow=False)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_cli_malformed_line_is_one_line_error_and_leaves_nothing(tmp_path, sp_model, capsys):
    # in-process (the subprocess round trip above covers the process boundary; megatron-core
    # takes seconds to import)
    from tools import preprocess_data

    good = [json.dumps({"text": f"The dog {word}."}) for word in ("ran", "sat", "slept")]
    bad = write_lines(tmp_path / "bad.jsonl", good[:2] + ['{"text": "oops'] + good)
    before = sorted(os.listdir(tmp_path))
    status = preprocess_data.main([
        "--input", str(bad), "--tokenizer-type", "sentencepiece", "--tokenizer-model",
        str(sp_model), "--output-prefix", str(tmp_path / "o"), "--workers", "2"])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert captured.err.splitlines() == [
        f"error: {bad}:3: malformed JSON: Unterminated string starting at (column 10)"]
    assert sorted(os.listdir(tmp_path)) == before


def test_bad_lines_library(tmp_path, sp_model):
    lines = [json.dumps({"text": "One."}), json.dumps({"body": "no text key"}), "",
             json.dumps({"text": 5}), "[1, 2]", json.dumps({"text": "Two."})]
    path = write_lines(tmp_path / "in.jsonl", lines)
    with open(path, "ab") as stream:
        stream.write(b'{"text": "caf\xe9"}\n')  # latin-1, not UTF-8

    def run(**kwargs):
        return preprocess(PreprocessConfig([path], tmp_path / "o", "sentencepiece", sp_model,
                                           **kwargs))

    with pytest.raises(BadInputError, match=re.escape(f"{path}:2: missing key 'text'")) as err:
        run()
    assert "\n" not in str(err.value)
    assert os.listdir(tmp_path) == ["in.jsonl"]
    stats = run(skip_bad_lines=True)
    assert (stats.documents, stats.bad_lines) == (2, 4)  # the blank line is ignored, not bad
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(BadInputError, match=re.escape(f"{latin1}:2: malformed JSON: not valid UTF-8")):
        preprocess(PreprocessConfig([latin1], tmp_path / "o2", "sentencepiece", sp_model))
    assert stats.tokens == len(build_tokenizer("sentencepiece", sp_model).tokenize("One.")) + len(
        build_tokenizer("sentencepiece", sp_model).tokenize("Two."))


def test_input_and_output_errors(tmp_path, sp_model):
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    good = write_lines(tmp_path / "good.jsonl", [json.dumps({"text": "Hello there."})])

    def run(inputs, **kwargs):
        return preprocess(PreprocessConfig(inputs, tmp_path / "o", "sentencepiece", sp_model,
                                           **kwargs))

    with pytest.raises(BadInputError, match="no documents in input"):
        run([empty])
    with pytest.raises(BadInputError, match=re.escape(f"input file not found: {tmp_path / 'x'}")):
        run([good, tmp_path / "x"])
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl", "good.jsonl"]
    first = run([good])
    with pytest.raises(BadInputError, match="output exists: .*o_text_document.bin .*--overwrite"):
        run([good])
    again = run([good, good], overwrite=True)
    assert (first.documents, again.documents) == (1, 2)
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl", "good.jsonl", "o_text_document.bin",
                                            "o_text_document.idx"]


def test_failure_in_later_file_keeps_previous_outputs_intact(tmp_path, sp_model, sp_tokenizer):
    good = synthetic.write_jsonl(synthetic.general_corpus(600, seed=2), tmp_path / "good.jsonl")
    bad = write_lines(tmp_path / "bad.jsonl", [json.dumps({"text": "fine"}), "not json"])
    old = preprocess(PreprocessConfig([good], tmp_path / "o", "sentencepiece", sp_model))
    old_bytes = Path(old.output_prefix + ".bin").read_bytes()
    with pytest.raises(BadInputError, match=re.escape(f"{bad}:2:")):
        preprocess(PreprocessConfig([good, bad], tmp_path / "o", "sentencepiece", sp_model,
                                    workers=2, overwrite=True))
    assert Path(old.output_prefix + ".bin").read_bytes() == old_bytes
    assert len(read_documents(old.output_prefix, sp_tokenizer, strip_eod=False)) == 600
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "good.jsonl", "o_text_document.bin",
                                            "o_text_document.idx"]


# --- blends and validation sets ------------------------------------------------------------

def test_parse_data_path_and_valid_data():
    assert parse_data_path(["p"]).weights is None
    blend = parse_data_path(["1.0", "a", "1.5", "b"])
    assert blend.prefixes == ["a", "b"] and blend.weights == pytest.approx([0.4, 0.6])
    assert parse_data_path(["a", "b"]).weights is None
    assert parse_data_path(["2", "only"]).weights is None
    for bad in (["1", "a", "b"], ["1", "2"], [], ["-1", "a", "2", "b"]):
        with pytest.raises(DataSpecError):
            parse_data_path(bad)
    assert parse_valid_data(["gen=/x/g", "dom=/x/d"]) == {"gen": "/x/g", "dom": "/x/d"}
    for bad in (["nameonly"], ["a=x", "a=y"], ["=x"]):
        with pytest.raises(DataSpecError):
            parse_valid_data(bad)


def test_blend_proportions(tmp_path, prefixes, sp_tokenizer):
    train, valid = build_datasets(["1.0", prefixes["general"], "1.5", prefixes["domain"]],
                                  "98,2,0", None, SEQ, 1234, 4000, 40, sp_tokenizer,
                                  str(tmp_path / "cache"))
    assert len(train) == 4000 and list(valid) == ["valid"] and len(valid["valid"]) >= 40
    ids = numpy.array([train[i]["dataset_id"] for i in range(len(train))])
    assert abs((ids == 0).mean() - 0.4) < 0.01 and abs((ids == 1).mean() - 0.6) < 0.01
    for i in range(0, 4000, 20):  # the content agrees with the claimed source
        sample = train[i]
        assert is_general(sp_tokenizer.detokenize(sample["tokens"].tolist())) == (
            sample["dataset_id"] == 0)
        assert sample["tokens"].shape == (SEQ,) and torch.equal(sample["tokens"][1:],
                                                                sample["labels"][:-1])


def test_split_keeps_train_and_valid_documents_apart(tmp_path, prefixes, sp_tokenizer):
    train, valid = build_datasets([prefixes["general"]], "90,10,0", None, SEQ, 1, 200, 20,
                                  sp_tokenizer, str(tmp_path / "cache"))
    train_docs, valid_docs = set(train.indices.tolist()), set(valid["valid"].indices.tolist())
    assert not train_docs & valid_docs and len(train_docs) + len(valid_docs) == 400
    with pytest.raises(DataSpecError, match="leaves nothing for training"):
        build_datasets([prefixes["general"]], "0,1,0", None, SEQ, 1, 10, 1, sp_tokenizer, None)
    with pytest.raises(DataSpecError, match="valid split .* has no tokens"):
        build_datasets([prefixes["general"]], "9999,1,0", None, SEQ, 1, 10, 1, sp_tokenizer, None)


def test_named_validation_sets(tmp_path, prefixes, sp_tokenizer):
    train, valid = build_datasets(
        ["1", prefixes["general"], "1", prefixes["domain"]], "969,30,1",
        ["general=" + prefixes["general"], "domain=" + prefixes["domain"]],
        SEQ, 5, 500, 30, sp_tokenizer, str(tmp_path / "cache"))
    assert list(valid) == ["general", "domain"]
    for name, dataset in valid.items():
        assert dataset.dataset.path_prefix == prefixes[name] and len(dataset) >= 30
        texts = [sp_tokenizer.detokenize(dataset[i]["tokens"].tolist()) for i in range(30)]
        assert all(is_general(text) == (name == "general") for text in texts)
    # the whole blend trains (no split carved out)
    assert {len(d.indices) for d in train.datasets} == {400}
    single_train, single_valid = build_datasets(
        [prefixes["general"]], "1", {"dom": prefixes["domain"]}, SEQ, 5, 50, 5, sp_tokenizer,
        str(tmp_path / "cache"))
    assert list(single_valid) == ["dom"] and single_valid["dom"].dataset.path_prefix == prefixes["domain"]


def test_missing_prefix_is_named(tmp_path, prefixes, sp_tokenizer):
    missing = str(tmp_path / "nope_text_document")
    with pytest.raises(DataSpecError, match=re.escape(f"dataset file not found: {missing}.bin")):
        build_datasets([prefixes["general"]], "1", {"v": missing}, SEQ, 1, 10, 1, sp_tokenizer, None)


def test_index_cache_is_reused(tmp_path, prefixes, sp_tokenizer):
    cache = tmp_path / "cache"
    args = (["1", prefixes["general"], "3", prefixes["domain"]], "95,5,0", None, SEQ, 7, 300, 10,
            sp_tokenizer, str(cache))
    first, _ = build_datasets(*args)
    files = sorted(os.listdir(cache))
    assert any("BlendedDataset-train" in name for name in files)  # written without torch.distributed
    mtimes = {name: os.stat(cache / name).st_mtime_ns for name in files}
    second, _ = build_datasets(*args)
    assert {name: os.stat(cache / name).st_mtime_ns for name in os.listdir(cache)} == mtimes
    assert all(torch.equal(first[i]["tokens"], second[i]["tokens"]) for i in range(0, 300, 7))


# --- micro-batches -------------------------------------------------------------------------

def test_micro_batches_follow_megatron_sampler(tmp_path, prefixes, sp_tokenizer):
    train, _ = build_datasets([prefixes["domain"]], "1", None, SEQ, 3, 64, 0, sp_tokenizer,
                              str(tmp_path / "cache"))
    whole = MicroBatchIterator(train, micro_batch_size=4)
    single = [next(whole)["tokens"] for _ in range(6)]
    assert whole.consumed_samples == 24
    ranks = [MicroBatchIterator(train, 2, dp_rank=r, dp_size=2) for r in range(2)]
    for step in range(6):  # each dp step covers the same 4 global samples as one mbs=4 batch
        pair = torch.cat([next(it)["tokens"] for it in ranks])
        assert torch.equal(pair, single[step])
    assert ranks[1].consumed_samples == 24
    batch = next(MicroBatchIterator(train, 2))
    assert batch["attention_mask"] is None
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask"}
    assert batch["position_ids"][0].tolist() == list(range(SEQ))
    resumed = MicroBatchIterator(train, 4, consumed_samples=12)
    assert torch.equal(next(resumed)["tokens"], single[3])
    tail = MicroBatchIterator(train, 4, consumed_samples=len(train) - 5)
    assert len(tail) == 1 and len(list(tail)) == 1


def _distributed_build(rank, world, store, prefixes, model, cache, queue):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=world)
    try:
        tokenizer = build_tokenizer("sentencepiece", model)
        train, valid = build_datasets(["1", prefixes["general"], "2", prefixes["domain"]],
                                      "90,10,0", None, SEQ, 11, 300, 12, tokenizer, cache)
        queue.put((rank, train[123]["tokens"].tolist(), valid["valid"][5]["tokens"].tolist()))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_build_under_gloo_matches_single_process(tmp_path, prefixes, sp_model, sp_tokenizer):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    args = (str(tmp_path / "store"), prefixes, str(sp_model), str(tmp_path / "cache"), queue)
    procs = [context.Process(target=_distributed_build, args=(rank, 2, *args)) for rank in range(2)]
    for proc in procs:
        proc.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0, 0]
    train, valid = build_datasets(["1", prefixes["general"], "2", prefixes["domain"]], "90,10,0",
                                  None, SEQ, 11, 300, 12, sp_tokenizer, str(tmp_path / "local"))
    expected = (train[123]["tokens"].tolist(), valid["valid"][5]["tokens"].tolist())
    assert [tuple(r[1:]) for r in results] == [expected, expected]


def test_truncated_or_mismatched_dataset_files_are_refused_by_name(prefixes, tmp_path):
    """A .bin cut short (a copy that ran out of space) or paired with another index is named before
    training starts, not found by a rank steps later."""
    import shutil

    from megatron_llamapro.data.blend import DataSpecError, check_prefixes_exist

    check_prefixes_exist([prefixes["general"]])  # a good pair passes
    damaged = str(tmp_path / "general")
    for suffix in (".bin", ".idx"):
        shutil.copy(prefixes["general"] + suffix, damaged + suffix)
    size = Path(damaged + ".bin").stat().st_size
    with open(damaged + ".bin", "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(DataSpecError, match=rf"general\.bin: truncated \({size - 10} bytes, .*general\.idx "
                                            rf"describes {size}\)"):
        check_prefixes_exist([damaged])
    shutil.copy(prefixes["domain"] + ".bin", damaged + ".bin")
    with pytest.raises(DataSpecError, match=r"general\.bin: (truncated|longer than its index describes)"):
        check_prefixes_exist([damaged])
    Path(damaged + ".idx").write_bytes(b"not an index")
    with pytest.raises(DataSpecError, match=r"general\.idx: not a megatron-core IndexedDataset index"):
        check_prefixes_exist([damaged])
