"""Instruction tuning (--sft): chat preprocessing with its target mask, the loss on assistant tokens
against Hugging Face's, packing, training and resume through the real command line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy
import pytest
import torch

from tests.lib import metrics_records, run_tool_inprocess
from tests.lib import run_tool as _run_tool
from tests.training_lib import PYTHON, REPO, assets, child_env, losses  # noqa: F401 (fixture)

SEQ = 256


def run_tool(tool: str, *args) -> tuple[int, str, str]:
    proc = _run_tool(tool, *args)
    return proc.returncode, proc.stdout, proc.stderr


def _preprocess(out_prefix: Path, records, *extra, tokenizer: Path, expect: int = 0, input_name: str | None = None,
                capsys=None):
    """tools/preprocess_data.py --chat on `records`: in this process with `capsys`, else a subprocess."""
    from megatron_llamapro.data.synthetic import write_records

    path = write_records(records, out_prefix.parent / (input_name or f"{out_prefix.name}.jsonl"))
    argv = ["--chat", "--input", str(path), "--tokenizer-model", str(tokenizer), "--output-prefix", str(out_prefix),
            *extra]
    code, out, err = run_tool_inprocess("preprocess_data", argv, capsys) if capsys else run_tool("preprocess_data", *argv)
    assert code == expect, err
    return path, out, err


@pytest.fixture(scope="module")
def chat_sets(assets, tmp_path_factory) -> dict[str, str]:
    """Chat sets tokenized with the expanded checkpoint's own (sentencepiece) tokenizer."""
    from megatron_llamapro.data.synthetic import chat_samples

    root = tmp_path_factory.mktemp("chat")
    _preprocess(root / "train", chat_samples(240), tokenizer=assets.expanded)
    _preprocess(root / "valid", chat_samples(24, seed=1), tokenizer=assets.expanded)
    return {"train": str(root / "train_chat_document"), "valid": str(root / "valid_chat_document"),
            "root": str(root)}


@pytest.fixture(scope="module")
def hf_chat_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer with a ChatML-style chat_template."""
    from megatron_llamapro.data.synthetic import chat_samples, general_corpus, train_hf_bpe

    out = train_hf_bpe(general_corpus(200) + [m["content"] for s in chat_samples(200) for m in s["messages"]],
                       400, tmp_path_factory.mktemp("bpe"))
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<|begin_of_text|>{{ m['role'] }}\n{{ m['content'] }}"
                               "<|end_of_text|>\n{% endfor %}{% if add_generation_prompt %}<|begin_of_text|>"
                               "assistant\n{% endif %}")
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def _target_runs(tokens, mask) -> list[list[int]]:
    runs, current = [], []
    for token, on in zip(tokens, mask):
        if on:
            current.append(int(token))
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 + 3 = 5."},
                {"role": "user", "content": "And 4 times 5?"}, {"role": "assistant", "content": "4 * 5 = 20."}]


def test_llama2_format_masks_each_assistant_turn(assets, tmp_path, capsys):
    """sentencepiece tokenizer: LLaMA-2's [INST] format, built piece by piece as Meta's code does;
    only the replies and their EOS are targets, turn by turn."""
    import sentencepiece

    from megatron_llamapro.data.chat_indexed import ChatIndexedDataset

    _, out, _ = _preprocess(tmp_path / "c", [{"messages": CONVERSATION}], tokenizer=assets.expanded, capsys=capsys)
    assert "chat template: llama-2 [INST]" in out
    tokens, mask = ChatIndexedDataset(str(tmp_path / "c_chat_document"))[0]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(assets.hf / "tokenizer.model"))
    first = [sp.bos_id()] + sp.encode("[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nWhat is 2 plus 3? [/INST]")
    reply1 = sp.encode("2 + 3 = 5.") + [sp.eos_id()]
    second = [sp.bos_id()] + sp.encode("[INST] And 4 times 5? [/INST]")
    reply2 = sp.encode("4 * 5 = 20.") + [sp.eos_id()]
    assert tokens.tolist() == first + reply1 + second + reply2
    assert mask.tolist() == [0] * len(first) + [1] * len(reply1) + [0] * len(second) + [1] * len(reply2)


def test_the_three_line_formats_give_the_same_sample(assets, tmp_path, capsys):
    from megatron_llamapro.data.chat_indexed import ChatIndexedDataset

    records = [{"messages": [{"role": "user", "content": "Say hi.\n\nto Anna"}, {"role": "assistant", "content": "Hi Anna."}]},
               {"conversations": [{"from": "human", "value": "Say hi.\n\nto Anna"}, {"from": "gpt", "value": "Hi Anna."}]},
               {"instruction": "Say hi.", "input": "to Anna", "output": "Hi Anna."}]
    _preprocess(tmp_path / "f", records, tokenizer=assets.expanded, capsys=capsys)
    chat = ChatIndexedDataset(str(tmp_path / "f_chat_document"))
    assert len(chat) == 3
    for i in (1, 2):
        assert chat[i][0].tolist() == chat[0][0].tolist() and chat[i][1].tolist() == chat[0][1].tolist()


def test_hf_chat_template_tokens_and_targets(hf_chat_tokenizer, tmp_path, capsys):
    """An HF tokenizer with a chat_template: the tokens are transformers' own rendering, the targets
    exactly each assistant turn's content and the template's end of turn."""
    from transformers import AutoTokenizer

    from megatron_llamapro.data.chat_indexed import ChatIndexedDataset

    _, out, _ = _preprocess(tmp_path / "h", [{"messages": CONVERSATION}], tokenizer=hf_chat_tokenizer, capsys=capsys)
    assert "chat template: the tokenizer's chat_template" in out
    tokens, mask = ChatIndexedDataset(str(tmp_path / "h_chat_document"))[0]
    hf = AutoTokenizer.from_pretrained(str(hf_chat_tokenizer), local_files_only=True)
    expected = hf.apply_chat_template(CONVERSATION, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert tokens.tolist() == list(expected)
    replies = [hf.decode(run) for run in _target_runs(tokens, mask)]
    assert replies == ["2 + 3 = 5.<|end_of_text|>\n", "4 * 5 = 20.<|end_of_text|>\n"]


BAD_LINES = [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn (nothing to train on)"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
     "messages[1]: unknown role 'bot' (one of system, user, assistant)"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
                        {"from": "human", "value": "and?"}]}, "turn 2: the last user turn has no assistant reply"),
    ({"messages": [{"role": "assistant", "content": "x"}]},
     "turn 0: a assistant turn where a user turn belongs (turns alternate user/assistant after an optional system turn)"),
    ({"text": "plain"}, "expected 'messages', 'conversations' (ShareGPT) or 'instruction'/'output' (Alpaca); keys found: text"),
]


@pytest.mark.parametrize("record,reason", BAD_LINES, ids=["no-assistant", "unknown-role", "trailing-user",
                                                           "starts-with-assistant", "not-chat"])
def test_a_bad_sample_names_file_and_line_and_writes_nothing(assets, tmp_path, record, reason, capsys):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path, _, err = _preprocess(tmp_path / "b", [good, good, record, good], tokenizer=assets.expanded, expect=2,
                               capsys=capsys)
    assert err.strip().splitlines() == [f"error: {path}:3: {reason}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_malformed_json_line_and_skip_bad_lines(assets, tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    path = tmp_path / "m.jsonl"
    path.write_text(good + "\n" + '{"messages": [\n' + good + "\n")
    code, _, err = run_tool("preprocess_data", "--chat", "--input", str(path), "--tokenizer-model", str(assets.expanded),
                            "--output-prefix", str(tmp_path / "m"))
    assert code == 2 and err.strip() == f"error: {path}:2: malformed JSON: Expecting value (column 15)"
    code, out, err = run_tool("preprocess_data", "--chat", "--input", str(path), "--tokenizer-model",
                              str(assets.expanded), "--output-prefix", str(tmp_path / "m"), "--skip-bad-lines")
    assert code == 0, err
    assert out.startswith("2 chat samples,") and "1 bad lines skipped" in out


def test_workers_write_identical_sets(assets, chat_sets, tmp_path):
    source = Path(chat_sets["root"]) / "train.jsonl"
    for workers in ("1", "3"):
        code, _, err = run_tool("preprocess_data", "--chat", "--input", str(source), "--tokenizer-model",
                                str(assets.expanded), "--output-prefix", str(tmp_path / f"w{workers}"),
                                "--workers", workers)
        assert code == 0, err
    for suffix in (".bin", ".idx", "_loss_mask.bin", "_loss_mask.idx"):
        assert (tmp_path / f"w1_chat_document{suffix}").read_bytes() == \
            (tmp_path / f"w3_chat_document{suffix}").read_bytes() == \
            Path(chat_sets["train"] + suffix).read_bytes()


def test_packing_layout_and_resets(chat_sets):
    """Next-fit packing; in a packed sequence every sample keeps its own tokens, labels and target
    mask, its segment id and positions restart at its first token, and the padding after the last
    sample is a segment of its own that is never trained on."""
    from megatron_llamapro.data.chat_indexed import ChatIndexedDataset
    from megatron_llamapro.data.sft import ChatSamples, SFTDataset, SFTSettings, pack_order

    assert [s.tolist() for s in pack_order(numpy.array([5, 3, 4, 8, 1]), numpy.arange(5), 8, "pack")] == \
        [[0, 1], [2], [3], [4]]
    assert [s.tolist() for s in pack_order(numpy.array([5, 3]), numpy.arange(2), 8, "pad")] == [[0], [1]]

    chat = ChatIndexedDataset(chat_sets["train"])
    dataset = SFTDataset(ChatSamples([chat], [numpy.arange(len(chat))], SFTSettings(SEQ, "pack", pad_id=0), "t"),
                         None)
    index = next(i for i in range(len(dataset)) if len(dataset.refs(i)) > 1)
    item, at = dataset[index], 0
    for segment, ref in enumerate(dataset.refs(index)):
        tokens, target = chat[int(ref)]
        n = len(tokens) - 1
        assert item["tokens"][at:at + n].tolist() == tokens[:-1].tolist()
        assert item["labels"][at:at + n].tolist() == tokens[1:].tolist()
        assert item["loss_mask"][at:at + n].tolist() == target[1:].astype(float).tolist()
        assert item["position_ids"][at:at + n].tolist() == list(range(n))
        assert set(item["segment_ids"][at:at + n].tolist()) == {segment}
        at += n
    assert at < SEQ, "the chosen sequence has padding"
    assert item["loss_mask"][at:].sum() == 0 and set(item["segment_ids"][at:].tolist()) == {segment + 1}
    assert item["position_ids"][at:].tolist() == list(range(SEQ - at))


# ---- the loss: against Hugging Face, packed against alone, gradients --------------------------------

@pytest.fixture(scope="module")
def parity(assets, chat_sets):
    from megatron_llamapro.runtime.multiproc import run_distributed
    from tests.sft_lib import sft_parity

    return run_distributed(sft_parity, 1, str(assets.base), chat_sets["train"], 512, 6, timeout=240)[0], chat_sets


def test_loss_is_hf_loss_with_untrained_labels_ignored(assets, parity):
    """The trainer's loss on a batch of chat samples (padded, one per row) equals transformers'
    LlamaForCausalLM loss on the same tokens with labels -100 on every non-assistant token (fp32)."""
    from transformers import AutoModelForCausalLM

    from megatron_llamapro.data.chat_indexed import ChatIndexedDataset

    result, chat_sets = parity
    chat = ChatIndexedDataset(chat_sets["train"])
    samples = [chat[i] for i in range(6)]
    width = max(len(t) for t, _ in samples)
    ids = torch.zeros(6, width, dtype=torch.long)
    attention = torch.zeros(6, width, dtype=torch.long)
    labels = torch.full((6, width), -100, dtype=torch.long)
    for row, (tokens, mask) in enumerate(samples):
        ids[row, :len(tokens)] = torch.as_tensor(tokens)
        attention[row, :len(tokens)] = 1
        labels[row, :len(tokens)] = torch.where(torch.as_tensor(mask), torch.as_tensor(tokens), -100)
    model = AutoModelForCausalLM.from_pretrained(str(assets.hf), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        hf_loss = float(model(input_ids=ids, attention_mask=attention, labels=labels).loss)
    assert abs(result["batch_loss"] - hf_loss) <= 1e-5, (result["batch_loss"], hf_loss)


def test_untrained_tokens_get_no_gradient(parity):
    result, _ = parity
    assert result["grads_same_when_untrained_labels_change"]
    assert result["grads_change_when_a_target_label_changes"]


def test_a_packed_sequence_gives_each_sample_its_loss_alone(parity):
    result, _ = parity
    assert any(n > 1 for n in result["layout"]), result["layout"]  # samples really shared sequences
    numpy.testing.assert_allclose(result["packed"], result["alone"], rtol=1e-5, atol=1e-5)


# ---- training through the command line --------------------------------------------------------------

def _sft_args(assets, chat_sets, save: Path, iters: int, *extra: str) -> list[str]:
    return ["--sft", "--load", str(assets.expanded), "--save", str(save), "--data-path", chat_sets["train"],
            "--valid-data", f"chat={chat_sets['valid']}", f"general={assets.general}",
            "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", str(iters), "--lr", "1e-3", "--lr-decay-style", "constant", "--lr-warmup-iters", "0",
            "--fp32", "--deterministic", "--eval-interval", "3", "--eval-iters", "2",
            "--data-cache-dir", str(assets.root / "cache"), *extra]


def _pretrain(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "megatron_llamapro.pretrain", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sft_reference(assets, chat_sets, tmp_path_factory):
    save = tmp_path_factory.mktemp("sft") / "ref"
    proc = _pretrain(_sft_args(assets, chat_sets, save, 6, "--save-interval", "3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return save, proc.stdout


def test_sft_trains_every_parameter_on_assistant_tokens_and_watches_forgetting(sft_reference):
    save, out = sft_reference
    assert "trainable: all parameters" in out
    assert "chat set 'train': 240 of 240 samples" in out and "packed into" in out
    evals = [r for r in metrics_records(save / "metrics.jsonl") if "valid_loss/chat" in r]
    assert [r["iteration"] for r in evals] == [0, 3, 6]
    assert all("valid_loss/general" in r for r in evals)
    assert evals[-1]["valid_loss/chat"] < evals[0]["valid_loss/chat"]
    train = losses(save / "metrics.jsonl")
    assert train[6] < train[1]
    steps = [r for r in metrics_records(save / "metrics.jsonl") if "loss" in r]
    assert all(0 < r["loss_tokens"] < 4 * SEQ for r in steps)  # the answer tokens of each global batch


def test_sft_resumes_mid_epoch_with_the_uninterrupted_losses(assets, chat_sets, sft_reference, tmp_path):
    ref, _ = sft_reference
    save = tmp_path / "resumed"
    first = _pretrain(_sft_args(assets, chat_sets, save, 3, "--save-interval", "3"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = _pretrain(_sft_args(assets, chat_sets, save, 6, "--save-interval", "3"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from iteration 3" in second.stdout
    expected, got = losses(ref / "metrics.jsonl"), losses(save / "metrics.jsonl")
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for it in range(1, 7):
        assert got[it] == pytest.approx(expected[it], rel=1e-6, abs=1e-6), it


@pytest.mark.parametrize("case", ["text-under-sft", "chat-without-sft", "weights"])
def test_data_paths_that_do_not_fit_the_mode_are_refused_at_check(assets, chat_sets, tmp_path, case):
    args = _sft_args(assets, chat_sets, tmp_path / "s", 2)
    if case == "text-under-sft":
        args[args.index("--data-path") + 1] = assets.domain
        line = (f"error: --data-path {assets.domain}: not a chat set (no {assets.domain}.chat.json); --sft trains on "
                "tools/preprocess_data.py --chat output (<prefix>_chat_document)")
    elif case == "chat-without-sft":
        args.remove("--sft")
        line = (f"error: --data-path {chat_sets['train']}: a chat set (tools/preprocess_data.py --chat); "
                "train on it with --sft")
    else:
        at = args.index("--data-path") + 1
        args[at:at + 1] = ["0.5", chat_sets["train"], "0.5", chat_sets["valid"]]
        line = ("error: --sft: --data-path weights are not supported for chat sets (the samples of all chat sets "
                "are shuffled together); list the chat set prefixes without weights")
    proc = _pretrain(args + ["--check"], timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == line


def test_block_mask_and_thd_segments():
    """Local attention: a position sees earlier positions of its own sample only. TE: one segment
    per sample and per padding run, rows kept apart."""
    from megatron_llamapro.pipeline import block_causal_mask, packed_seq_params_for

    segments = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1]])
    allowed = ~block_causal_mask(segments)[:, 0]
    assert allowed[0].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                                         [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    params = packed_seq_params_for(segments)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 2, 5, 6, 10, 12] and params.max_seqlen_q == 4


@pytest.mark.parametrize("policy", ["truncate", "skip", "error"])
def test_over_long_samples_follow_the_flag_and_are_counted(chat_sets, policy):
    from megatron_llamapro.data.chat_indexed import ChatDataError, ChatIndexedDataset
    from megatron_llamapro.data.sft import ChatSamples, SFTDataset, SFTSettings

    chat = ChatIndexedDataset(chat_sets["train"])
    seq = 96
    long = int((numpy.asarray(chat.lengths) > seq + 1).sum())
    assert 0 < long < len(chat)
    settings = SFTSettings(seq, "pack", policy, pad_id=0)
    if policy == "error":
        with pytest.raises(ChatDataError, match=rf"^{chat.prefix}: sample \d+ has \d+ tokens, more than --seq-length "
                                                rf"96 \+ 1 \({long} such samples\); raise --seq-length or pass "
                                                r"--sft-overlong truncate\|skip$"):
            ChatSamples([chat], [numpy.arange(len(chat))], settings, "train")
        return
    samples = ChatSamples([chat], [numpy.arange(len(chat))], settings, "train")
    dataset = SFTDataset(samples, 10)
    counts = samples.counts
    if policy == "truncate":
        assert counts.truncated == long and counts.used == len(chat) - counts.skipped_no_target
        assert f"{long} truncated to 97 tokens" in dataset.describe()
    else:
        assert counts.skipped_long == long and counts.used == len(chat) - long
        assert f"{long} over-long skipped" in dataset.describe()
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["tokens"].shape == (seq,) and item["loss_mask"].sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--pp", "2"], ["--tp", "2"], []], ids=["pp2", "tp2", "dp2"])
def test_sft_on_two_ranks_gives_the_single_rank_losses(assets, chat_sets, sft_reference, tmp_path, layout):
    """The per-token loss is the same however the global batch is split over pipeline stages, tensor
    shards and data-parallel ranks."""
    ref, _ = sft_reference
    save = tmp_path / "two"
    proc = subprocess.run([PYTHON, str(REPO / "tools" / "pretrain_expand.py"), "--nproc-per-node", "2",
                           *_sft_args(assets, chat_sets, save, 3), *layout],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    expected, got = losses(ref / "metrics.jsonl"), losses(save / "metrics.jsonl")
    for it in (1, 2, 3):
        assert got[it] == pytest.approx(expected[it], rel=1e-5, abs=1e-5), (it, got, expected)


@pytest.mark.parametrize("extra,trains", [([], "trains all parameters"),
                                          (["--train-new-blocks"], "trains layers [3, 7]"),
                                          (["--trainable-layers", "0-1"], "trains layers [0, 1]")])
def test_sft_trains_everything_unless_told(assets, chat_sets, tmp_path, extra, trains):
    proc = _pretrain(_sft_args(assets, chat_sets, tmp_path / "s", 2, *extra) + ["--check"], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].endswith(trains), proc.stdout
