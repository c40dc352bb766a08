"""Every file a tokenizer consists of travels byte for byte through convert, reshard, expand and
export, and the exported model's tokenizer still applies its chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import fixtures

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def hf_with_every_tokenizer_file(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny LLaMA whose directory holds each kind of tokenizer file transformers and its
    predecessors write: tokenizer.json + tokenizer_config.json + chat_template.jinja (transformers 5),
    vocab.json + merges.txt (slow BPE), added_tokens.json, special_tokens_map.json, a sentencepiece
    tokenizer.model, additional_chat_templates/, generation_config.json."""
    from transformers import PreTrainedTokenizerFast

    from megatron_llamapro.data.synthetic import general_corpus, train_hf_bpe, train_sentencepiece

    root = tmp_path_factory.mktemp("tokfiles")
    texts = general_corpus(300)
    bpe_dir = train_hf_bpe(texts, 300, root / "bpe")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(bpe_dir / "tokenizer.json"),
                                        bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    hf = fixtures.make_tiny_hf(root / "hf", vocab=len(tokenizer))
    tokenizer.save_pretrained(str(hf))
    from tokenizers import Tokenizer

    Tokenizer.from_file(str(bpe_dir / "tokenizer.json")).model.save(str(hf))  # vocab.json + merges.txt
    (hf / "added_tokens.json").write_text(json.dumps({"<|extra|>": len(tokenizer)}) + "\n")
    (hf / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                            "eos_token": "<|end_of_text|>"}) + "\n")
    sp = train_sentencepiece(texts, 400, root / "sp")
    (hf / "tokenizer.model").write_bytes(sp.read_bytes())
    (hf / "additional_chat_templates").mkdir()
    (hf / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages | length }}\n")
    expected = ["additional_chat_templates/tool_use.jinja", "added_tokens.json", "chat_template.jinja",
                "generation_config.json", "merges.txt", "special_tokens_map.json", "tokenizer.json",
                "tokenizer.model", "tokenizer_config.json", "vocab.json"]
    for name in expected:
        assert (hf / name).is_file(), f"fixture lacks {name}"
    return hf, expected


def _same_files(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        assert (b / name).is_file(), f"{b / name}: missing"
        assert (b / name).read_bytes() == (a / name).read_bytes(), f"{b / name}: differs from {a / name}"


def test_every_tokenizer_file_travels_and_the_chat_template_works(hf_with_every_tokenizer_file, tmp_path):
    from transformers import AutoTokenizer

    from megatron_llamapro.checkpoint.manifest import tokenizer_files
    from megatron_llamapro.cli import convert_hf_to_megatron, convert_megatron_to_hf, expand_blocks, reshard

    hf, names = hf_with_every_tokenizer_file
    assert tokenizer_files(hf) == sorted(names)  # and no weights, config.json or index among them
    legacy, dist, expanded, back = (tmp_path / n for n in ("legacy", "dist", "expanded", "back"))
    assert convert_hf_to_megatron.main(["--hf-dir", str(hf), "--out", str(legacy), "--tp", "2",
                                        "--pp", "2"]) == 0
    _same_files(hf, legacy / "tokenizer", names)
    assert reshard.main(["--in", str(legacy), "--out", str(dist), "--format", "torch_dist"]) == 0
    _same_files(hf, dist / "tokenizer", names)
    assert expand_blocks.main(["--in", str(dist), "--out", str(expanded), "--num-new-blocks", "2"]) == 0
    _same_files(hf, expanded / "tokenizer", names)
    assert convert_megatron_to_hf.main(["--megatron-dir", str(expanded), "--out", str(back)]) == 0
    _same_files(hf, back, names)

    messages = [{"role": "user", "content": "What is two plus two?"}]
    original = AutoTokenizer.from_pretrained(str(hf))
    exported = AutoTokenizer.from_pretrained(str(back))
    assert exported.chat_template == original.chat_template == {
        "default": CHAT_TEMPLATE, "tool_use": "{{ messages | length }}\n"}
    assert exported.apply_chat_template(messages, add_generation_prompt=True) == \
        original.apply_chat_template(messages, add_generation_prompt=True)
