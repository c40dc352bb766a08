"""Chat samples for instruction tuning: one JSON line -> turns -> (token ids, target mask).

Accepted line formats (one sample per line):

* ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` (OpenAI / HF);
  a content may also be a list of ``{"type": "text", "text": ...}`` parts;
* ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}``;
* Alpaca: ``{"instruction": "...", "input": "...", "output": "..."}`` (``input`` optional, appended
  to the instruction after a blank line; an optional ``system`` string).

A conversation is an optional system turn, then user/assistant turns alternating, starting with a
user turn and ending with an assistant turn. Anything else is refused with the reason (the caller
names the file and line).

Chat formats (`chat_format`):

* ``hf``: the tokenizer's own ``chat_template`` (tokenizer_config.json / chat_template.jinja),
  rendered by transformers. The target tokens are the characters each assistant turn adds: the
  conversation rendered up to the turn with the generation prompt, then with the turn; the
  difference is the assistant's content and the template's end-of-turn text.
* ``llama2``: LLaMA-2-chat's ``[INST]`` format as Meta's reference code encodes it, turn by turn:
  ``<s>[INST] {user} [/INST]`` (system folded into the first user turn as
  ``<<SYS>>\\n{system}\\n<</SYS>>\\n\\n``) untrained, then `` {assistant} </s>`` trained. The default
  for a sentencepiece-only tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from megatron_llamapro.data.tokenizer import Tokenizer, TokenizerError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bot": "assistant"}
FORMATS = ("auto", "hf", "llama2")


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


# ---- parsing -----------------------------------------------------------------------------------

def parse_chat_line(line: bytes | str) -> list[Turn]:
    """The turns of one JSONL line; ValueError with the reason when it is not a usable sample."""
    text = (line.decode("utf-8") if isinstance(line, bytes) else line).rstrip("\r\n")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        turns = _messages(record["messages"], "messages", "role", "content", None)
    elif "conversations" in record:
        turns = _messages(record["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
    elif "instruction" in record or "output" in record:
        turns = _alpaca(record)
    else:
        keys = ", ".join(sorted(record)[:6]) or "none"
        raise ValueError("expected 'messages', 'conversations' (ShareGPT) or 'instruction'/'output' (Alpaca); "
                         f"keys found: {keys}")
    check_conversation(turns)
    return turns


def _content(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise ValueError(f"{where}: content must be a string (or a list of text parts), got {type(value).__name__}")


def _messages(items, key: str, role_key: str, content_key: str, role_names: dict | None) -> list[Turn]:
    if not isinstance(items, list):
        raise ValueError(f"'{key}' must be a list of turns, got {type(items).__name__}")
    turns = []
    for number, item in enumerate(items, start=1):
        where = f"{key}[{number - 1}]"
        if not isinstance(item, dict) or role_key not in item or content_key not in item:
            raise ValueError(f"{where}: expected an object with '{role_key}' and '{content_key}'")
        role = item[role_key]
        mapped = (role_names or {r: r for r in ROLES}).get(role) if isinstance(role, str) else None
        if mapped is None:
            known = ", ".join(role_names or ROLES)
            raise ValueError(f"{where}: unknown role {role!r} (one of {known})")
        turns.append(Turn(mapped, _content(item[content_key], where)))
    return turns


def _alpaca(record: dict) -> list[Turn]:
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"Alpaca sample: '{key}' must be a string")
    for key in ("input", "system"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise ValueError(f"Alpaca sample: '{key}' must be a string")
    prompt = record["instruction"]
    if record.get("input"):
        prompt = f"{prompt}\n\n{record['input']}"
    turns = [Turn("system", record["system"])] if record.get("system") else []
    return turns + [Turn("user", prompt), Turn("assistant", record["output"])]


def check_conversation(turns: Sequence[Turn]) -> None:
    body = list(turns[1:]) if turns and turns[0].role == "system" else list(turns)
    offset = len(turns) - len(body)
    if not any(t.role == "assistant" for t in body):
        raise ValueError("no assistant turn (nothing to train on)")
    for index, turn in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn.role != expected:
            where = "a system turn after the first turn" if turn.role == "system" else f"a {turn.role} turn"
            raise ValueError(f"turn {index + offset}: {where} where a {expected} turn belongs "
                             "(turns alternate user/assistant after an optional system turn)")
        if turn.role == "assistant" and not turn.content.strip():
            raise ValueError(f"turn {index + offset}: empty assistant turn")
    if body[-1].role != "assistant":
        raise ValueError(f"turn {len(turns) - 1}: the last user turn has no assistant reply")


# ---- encoding ----------------------------------------------------------------------------------

class Llama2Format:
    """LLaMA-2-chat's [INST] format, encoded turn by turn (see the module docstring)."""

    name = "llama2"
    description = "llama-2 [INST]"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        # sentencepiece adds the space before a piece itself; byte-level BPE needs it spelled out
        self._space = "" if tokenizer.tokenizer_type == "sentencepiece" else " "

    def encode(self, turns: Sequence[Turn]) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        system = turns[0].content.strip() if turns[0].role == "system" else None
        body = turns[1:] if system is not None else turns
        bos = [] if tok.bos_id is None else [tok.bos_id]
        tokens: list[int] = []
        mask: list[int] = []
        for index in range(0, len(body), 2):
            user, answer = body[index].content.strip(), body[index + 1].content.strip()
            if index == 0 and system:
                user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
            prompt = bos + tok.tokenize(f"[INST] {user} [/INST]")
            reply = tok.tokenize(f"{self._space}{answer}") + [tok.eos_id]
            tokens += prompt + reply
            mask += [0] * len(prompt) + [1] * len(reply)
        return tokens, mask


class HFTemplateFormat:
    """The tokenizer's chat_template through transformers; targets found by rendering prefixes."""

    name = "hf"
    description = "the tokenizer's chat_template"

    def __init__(self, tokenizer_dir: Path) -> None:
        self._tok = load_hf_chat_tokenizer(tokenizer_dir)

    def encode(self, turns: Sequence[Turn]) -> tuple[list[int], list[int]]:
        messages = [{"role": t.role, "content": t.content} for t in turns]
        render = self._tok.apply_chat_template
        full = render(messages, tokenize=False)
        spans = []
        for index, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            before = render(messages[:index], tokenize=False, add_generation_prompt=True)
            through = render(messages[:index + 1], tokenize=False)
            if not (through.startswith(before) and full.startswith(through)):
                raise ValueError(f"turn {index}: the chat template does not render this conversation turn by "
                                 "turn (an earlier turn renders differently once later turns follow), so its "
                                 "assistant tokens cannot be found; use --chat-template llama2 or another template")
            spans.append((len(before), len(through)))
        encoded = self._tok(full, add_special_tokens=False, return_offsets_mapping=True)
        tokens = list(encoded["input_ids"])
        mask = [int(any(begin <= start < end for begin, end in spans)) for start, _ in encoded["offset_mapping"]]
        return tokens, mask


def load_hf_chat_tokenizer(tokenizer_dir: Path):
    """transformers' tokenizer for a directory, from local files only, with its chat template."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise TokenizerError(f"{tokenizer_dir}: transformers cannot load this tokenizer "
                             f"({str(err).splitlines()[0]})") from None
    if not getattr(tok, "chat_template", None):
        raise TokenizerError(f"{tokenizer_dir}: the tokenizer has no chat_template (in tokenizer_config.json or "
                             "chat_template.jinja); pass --chat-template llama2 for LLaMA-2's [INST] format")
    if not getattr(tok, "is_fast", False):
        raise TokenizerError(f"{tokenizer_dir}: --chat-template hf needs a fast tokenizer (tokenizer.json)")
    return tok


def has_hf_chat_template(tokenizer_dir: Path) -> bool:
    config = tokenizer_dir / "tokenizer_config.json"
    if (tokenizer_dir / "chat_template.jinja").is_file():
        return True
    try:
        return config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except ValueError:
        return False


def resolve_chat_format(requested: str, tokenizer_type: str, tokenizer_model: str | Path) -> str:
    """'hf' or 'llama2' for --chat-template auto|hf|llama2: auto picks the tokenizer's own template
    when a Hugging Face tokenizer has one, LLaMA-2's [INST] for a sentencepiece tokenizer."""
    if requested not in FORMATS:
        raise TokenizerError(f"--chat-template {requested}: must be one of {', '.join(FORMATS)}")
    if requested != "auto":
        return requested
    if tokenizer_type == "sentencepiece":
        return "llama2"
    directory = Path(tokenizer_model)
    directory = directory if directory.is_dir() else directory.parent
    if has_hf_chat_template(directory):
        return "hf"
    raise TokenizerError(f"--tokenizer-model {tokenizer_model}: a Hugging Face tokenizer without a chat_template; "
                         "add one (tokenizer_config.json) or pass --chat-template llama2")


def build_chat_format(name: str, tokenizer: Tokenizer, tokenizer_model: str | Path):
    if name == "llama2":
        return Llama2Format(tokenizer)
    directory = Path(tokenizer_model)
    return HFTemplateFormat(directory if directory.is_dir() else directory.parent)
