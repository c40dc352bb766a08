"""Deterministic synthetic corpora (nothing downloaded) and a LLaMA-like sentencepiece trainer.

* ``general_corpus``: English-like prose from a small grammar and word lists (no digits, no code).
* ``domain_corpus``: arithmetic facts, word problems and small Python-like functions whose
  answers are correct, so a small model can measurably learn the domain.

* ``chat_samples``: instruction-tuning conversations about the domain (questions whose answers are
  computed), as ``messages`` records: some with a system turn, some multi-turn.

All are pure functions of (count, seed) and produce thousands of documents per second.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Iterable, Iterator

_NAMES = ["Anna", "Ben", "Clara", "David", "Elena", "Felix", "Grace", "Hugo", "Iris", "Jonas",
          "Kate", "Leo", "Maria", "Noah", "Olivia", "Paul", "Rosa", "Sam", "Tara", "Victor"]
_ADJECTIVES = ["quiet", "bright", "old", "small", "large", "green", "gentle", "busy", "cold",
               "warm", "happy", "tired", "clever", "red", "narrow", "wide", "calm", "strange",
               "simple", "heavy", "soft", "early", "late", "young"]
_NOUNS = ["river", "garden", "house", "teacher", "village", "window", "dog", "cat", "letter",
          "road", "forest", "market", "friend", "book", "table", "bridge", "boat", "farmer",
          "child", "kitchen", "mountain", "street", "school", "song", "train", "door", "tree"]
_PLURALS = ["birds", "children", "farmers", "students", "neighbours", "travellers", "workers",
            "musicians", "families", "sailors", "painters", "visitors"]
_VERBS_PAST = ["found", "watched", "visited", "painted", "carried", "opened", "followed",
               "cleaned", "remembered", "described", "built", "closed", "passed", "noticed"]
_VERBS_PRESENT = ["sing", "walk", "rest", "work", "travel", "wait", "talk", "gather", "read",
                  "dance", "listen", "laugh"]
_INTRANSITIVE_PAST = ["walked", "waited", "slept", "laughed", "listened", "smiled", "arrived",
                      "stayed", "worked", "returned"]
_ADVERBS = ["slowly", "quietly", "happily", "often", "together", "carefully", "again", "outside",
            "early", "late"]
_PREPOSITIONS = ["near", "behind", "across", "under", "beside", "above", "along", "inside"]
_PLACES = ["market", "station", "library", "harbour", "park", "church", "bakery", "museum",
           "garden", "beach"]
_TIMES = ["yesterday", "last week", "in the morning", "after dinner", "before noon",
          "every evening", "on Sunday", "at night"]
_SEASONS = ["spring", "summer", "autumn", "winter"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_ITEMS = ["apples", "books", "coins", "pencils", "marbles", "eggs", "stamps", "cards"]
_FUNCTION_NAMES = ["add", "scale", "shift", "double", "triple", "offset"]


def _general_sentence(rng: random.Random) -> str:
    c = rng.choice
    form = rng.randrange(6)
    if form == 0:
        return f"The {c(_ADJECTIVES)} {c(_NOUNS)} {c(_VERBS_PAST)} the {c(_NOUNS)} {c(_PREPOSITIONS)} the {c(_NOUNS)}."
    if form == 1:
        return f"{c(_NAMES)} {c(_VERBS_PAST)} a {c(_ADJECTIVES)} {c(_NOUNS)} {c(_TIMES)}."
    if form == 2:
        return f"In {c(_SEASONS)}, the {c(_PLURALS)} {c(_VERBS_PRESENT)} {c(_ADVERBS)} {c(_PREPOSITIONS)} the {c(_NOUNS)}."
    if form == 3:
        return f"{c(_NAMES)} said that the {c(_NOUNS)} was {c(_ADJECTIVES)} and {c(_ADJECTIVES)}."
    if form == 4:
        first, second = rng.sample(_NAMES, 2)
        return f"Every {c(_DAYS)}, {first} and {second} {c(_INTRANSITIVE_PAST)} to the {c(_PLACES)}."
    return f"When the {c(_NOUNS)} {c(_INTRANSITIVE_PAST)}, the {c(_ADJECTIVES)} {c(_PLURALS)} {c(_VERBS_PRESENT)} {c(_ADVERBS)}."


def _general_doc(rng: random.Random) -> str:
    return " ".join(_general_sentence(rng) for _ in range(rng.randint(2, 6)))


def _arithmetic_line(rng: random.Random) -> str:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-*")
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a} {op} {b} = {value}"


def _word_problem(rng: random.Random) -> str:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    have, more = rng.randint(2, 50), rng.randint(2, 50)
    return f"Q: {name} has {have} {item} and gets {more} more. How many {item}? A: {have + more}"


def _function_block(rng: random.Random) -> str:
    name, k = rng.choice(_FUNCTION_NAMES), rng.randint(2, 9)
    op = rng.choice("+*")
    x = rng.randint(0, 20)
    value = x + k if op == "+" else x * k
    return (f"def {name}_{k}(x):\n"
            f"    return x {op} {k}\n"
            f"assert {name}_{k}({x}) == {value}")


def _domain_doc(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(2, 5)):
        kind = rng.randrange(3)
        if kind == 0:
            parts.append("\n".join(_arithmetic_line(rng) for _ in range(rng.randint(2, 4))))
        elif kind == 1:
            parts.append(_word_problem(rng))
        else:
            parts.append(_function_block(rng))
    return "\n".join(parts)


def general_corpus(num_docs: int, seed: int = 0) -> list[str]:
    """English-like prose documents (2-6 sentences each)."""
    rng = random.Random(2 * seed)
    return [_general_doc(rng) for _ in range(num_docs)]


def domain_corpus(num_docs: int, seed: int = 0) -> list[str]:
    """Arithmetic / code-like documents with correct answers."""
    rng = random.Random(2 * seed + 1)
    return [_domain_doc(rng) for _ in range(num_docs)]


_SYSTEM_PROMPTS = ["You are a careful assistant.", "Answer briefly and exactly.", "You help with arithmetic."]


def _chat_exchange(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op, word = rng.choice([("+", "plus"), ("-", "minus"), ("*", "times")])
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return f"What is {a} {word} {b}?", f"{a} {op} {b} = {value}. The answer is {value}."
    if kind == 1:
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        have, more = rng.randint(2, 50), rng.randint(2, 50)
        return (f"{name} has {have} {item} and gets {more} more. How many {item} does {name} have?",
                f"{name} has {have} + {more} = {have + more} {item}.")
    name, k = rng.choice(_FUNCTION_NAMES), rng.randint(2, 9)
    op = rng.choice("+*")
    x = rng.randint(0, 20)
    value = x + k if op == "+" else x * k
    return (f"Write a function {name}_{k} that returns x {op} {k}, and give {name}_{k}({x}).",
            f"def {name}_{k}(x):\n    return x {op} {k}\n{name}_{k}({x}) returns {value}.")


def chat_samples(num_samples: int, seed: int = 0) -> list[dict]:
    """``{"messages": [...]}`` conversations: an optional system turn, then 1-3 user/assistant exchanges."""
    rng = random.Random(2 * seed + 7)
    samples = []
    for _ in range(num_samples):
        messages = [{"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
        for _ in range(rng.choice((1, 1, 2, 3))):
            question, answer = _chat_exchange(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        samples.append({"messages": messages})
    return samples


def write_records(records: Iterable[dict], path: str | Path) -> Path:
    """JSON objects, one per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as stream:
        for record in records:
            stream.write(json.dumps(record) + "\n")
    return path


def write_jsonl(texts: Iterable[str], path: str | Path, key: str = "text") -> Path:
    """One JSON object per line, ``{key: text}``; gzip-compressed when the name ends in .gz."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as out:
        for text in texts:
            out.write(json.dumps({key: text}) + "\n")
    return path


def _lines(texts: Iterable[str]) -> Iterator[str]:
    # sentencepiece trains on lines; newlines themselves are covered by byte fallback as in LLaMA.
    for text in texts:
        for line in text.split("\n"):
            if line:
                yield line


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_dir: str | Path,
                        model_prefix: str = "tokenizer") -> Path:
    """Train a LLaMA-like sentencepiece model and return the path to ``<model_prefix>.model``.

    Settings follow LLaMA-2's tokenizer: BPE, byte_fallback, digits split, identity normalisation
    with whitespace kept (so detokenize(tokenize(text)) == text), unk=0 bos=1 eos=2 and no pad
    token (pad_id=-1; see tokenizer.py for how padding is handled). ``vocab_size`` must leave room
    for the 256 byte pieces and 3 specials, and the texts must support that many pieces
    (sentencepiece refuses otherwise; the synthetic corpora here support about 1500).
    """
    import sentencepiece

    if vocab_size < 259 + 8:
        raise ValueError(f"vocab_size {vocab_size} too small: byte fallback needs 259 ids plus merges")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts),
        model_prefix=str(out_dir / model_prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    return out_dir / f"{model_prefix}.model"


def train_hf_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Train a LLaMA-3 style byte-level BPE with the ``tokenizers`` library; returns ``out_dir``
    holding ``tokenizer.json`` and ``tokenizer_config.json`` (bos ``<|begin_of_text|>``, eos
    ``<|end_of_text|>``, no pad), loadable with ``build_tokenizer("hf", out_dir)``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # as LLaMA-3: encode(..., add_special_tokens=True) prepends BOS
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{specials[0]} $A", pair=f"{specials[0]} $A {specials[0]} $B",
        special_tokens=[(specials[0], tokenizer.token_to_id(specials[0]))])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {"bos_token": specials[0], "eos_token": specials[1], "pad_token": None,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
