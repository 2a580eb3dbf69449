"""Read and validate preference/demonstration files, tokenize through the chat template, pad and collate.

Schemas (TRL-style JSONL, one object per line):
    sft       {"prompt", "completion"}
    prefs     {"prompt", "responses": [K str], "ranking": [indices into responses, best first], "gold"?: [K]}
    pairs     {"prompt", "chosen", "rejected", "p"?: probability that chosen is better (soft label, default 1)}
    feedback  {"prompt", "answer", "label"}: one answer with a thumbs up (true) or down (false), for KTO
    prompts   {"prompt"}
    hh        {"chosen", "rejected"}: Anthropic-HH text ("\n\nHuman: ...\n\nAssistant: ..."), read as pairs
A prompt is a user message (str) or a list of {"role", "content"} messages. Bad input raises one
ValueError naming file, line and field, before anything is written.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoalign.tokenizer import ROLES, Tokenizer, render_prompt

SCHEMAS = {  # name -> required fields (checked in this order when detecting)
    "prefs": ("prompt", "responses", "ranking"),
    "pairs": ("prompt", "chosen", "rejected"),
    "sft": ("prompt", "completion"),
    "hh": ("chosen", "rejected"),
    "feedback": ("prompt", "answer", "label"),
    "prompts": ("prompt",),
}


def read_jsonl(path, schema: str | None = None) -> list[dict]:
    """Records of a JSONL file, validated against `schema` (detected from the first line if None).
    Each record keeps where it came from in "where" ("file:line") for later error messages;
    HH records come back in the pairs schema."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    records = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        _check_unicode(rec, where)
        if schema is None:
            schema = next((s for s, keys in SCHEMAS.items() if all(k in rec for k in keys)), None)
            if schema is None:
                raise ValueError(f"{where}: unknown schema with fields {sorted(rec)}; expected one of "
                                 + "; ".join(f"{s}: {list(k)}" for s, k in SCHEMAS.items()))
        records.append(_validate(rec, schema, where))
    if not records:
        raise ValueError(f"{path}: empty file, expected JSONL records")
    return records


def _validate(rec: dict, schema: str, where: str) -> dict:
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}; expected one of {sorted(SCHEMAS)}")
    for key in SCHEMAS[schema]:
        if key not in rec:
            raise ValueError(f"{where}: missing field {key!r} (schema {schema}: {list(SCHEMAS[schema])})")
    for key in ("completion", "chosen", "rejected", "answer"):
        if key in SCHEMAS[schema]:
            _check_text(rec[key], where, key)
    if schema == "hh":
        rec = _parse_hh(rec, where)
        if rec["chosen"] == rec["rejected"]:
            raise ValueError(f"{where}: the 'rejected' answer equals the 'chosen' one; a pair must compare two "
                             f"different answers")
        return rec
    _check_prompt(rec["prompt"], where)
    if schema == "prefs":
        responses, ranking = rec["responses"], rec["ranking"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise ValueError(f"{where}: field 'responses' must be a list of at least 2 strings")
        for i, r in enumerate(responses):
            _check_text(r, where, f"responses[{i}]")
        if not isinstance(ranking, list) or sorted(ranking) != list(range(len(responses))):
            raise ValueError(f"{where}: field 'ranking' must list each of the {len(responses)} response "
                             f"indices once, best first; got {ranking!r}")
        gold = rec.get("gold")  # optional: the true scores, for the accuracy ceilings (helpdesk.bayes_ceiling)
        if gold is not None and not (isinstance(gold, list) and len(gold) == len(responses)
                                     and all(_is_number(g) for g in gold)):
            raise ValueError(f"{where}: field 'gold' must be a list of {len(responses)} numbers, got {gold!r}")
    if schema == "pairs" and rec["chosen"] == rec["rejected"]:
        raise ValueError(f"{where}: field 'rejected' equals 'chosen'; a pair must compare two different answers")
    if schema == "prefs" and len(set(rec["responses"])) < len(rec["responses"]):
        i = next(i for i, r in enumerate(rec["responses"]) if rec["responses"].index(r) < i)
        raise ValueError(f"{where}: field 'responses[{i}]' repeats an earlier answer; a ranking must order "
                         f"different answers")
    if schema == "feedback" and not isinstance(rec["label"], bool):
        raise ValueError(f"{where}: field 'label' must be true (a thumbs up) or false (a thumbs down), "
                         f"got {rec['label']!r}")
    if schema == "pairs" and not (_is_number(rec.get("p", 1.0)) and 0 <= rec.get("p", 1.0) <= 1):
        raise ValueError(f"{where}: field 'p' (probability that 'chosen' is better) must be a number in [0, 1], "
                         f"got {rec['p']!r}")
    return {**rec, "where": where}


def read_rankings(path) -> list[dict]:
    """A prefs file's rankings, validated, without the "where" that read_jsonl adds: subsets of them are written
    out again for train_rm.py."""
    return [{key: v for key, v in r.items() if key != "where"} for r in read_jsonl(path, "prefs")]


def n_rankings(n_pairs: int, k: int) -> int:
    """Whole rankings of K = k answers closest to n_pairs pairs (C(k,2) pairs each), at least one."""
    return max(1, round(n_pairs / math.comb(k, 2)))


def write_jsonl(path, rows: list[dict]) -> None:
    """One JSON record per line, written beside `path` and renamed into place: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    tmp.replace(path)


def require_soft_labels(records: list[dict]) -> None:
    """For runs that ask for soft labels (AI feedback): every pair must carry its own "p"."""
    missing = next((r for r in records if "p" not in r), None)
    if missing is not None:
        raise ValueError(f"{missing['where']}: no field 'p' (the soft label P(chosen is better)), and soft labels "
                         f"were asked for (--soft_labels=True); label the pairs with python -m nanoalign.rlaif")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_unicode(value, where: str, field: str = "") -> None:
    """Every string in a record must be text UTF-8 can write: JSON's \\ud800-\\udfff escapes decode to lone
    surrogates, which fail later, in the tokenizer, with no file named."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{where}: field {field!r} holds a lone surrogate (\\u{ord(value[e.start]):04x} at "
                             f"character {e.start + 1}), not text") from None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        _check_unicode(v, where, f"{field}[{k}]" if isinstance(k, int) else f"{field}.{k}" if field else k)


def _check_text(value, where: str, field: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: field {field!r} is empty")


def _check_prompt(prompt, where: str) -> None:
    if isinstance(prompt, list):
        if not prompt:
            raise ValueError(f"{where}: field 'prompt' is an empty message list")
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: field 'prompt[{i}]' must be {{'role': one of {sorted(ROLES)}, "
                                 f"'content': str}}, got {m!r}")
    else:
        _check_text(prompt, where, "prompt")


def _parse_hh(rec: dict, where: str) -> dict:
    """Anthropic-HH: both texts share the dialogue up to the last "\\n\\nAssistant:"; what follows differs."""
    parsed = []
    for field in ("chosen", "rejected"):
        head, sep, answer = rec[field].rpartition("\n\nAssistant:")
        if not sep or not head.startswith("\n\nHuman:"):
            raise ValueError(f"{where}: field {field!r} is not HH text ('\\n\\nHuman: ...\\n\\nAssistant: ...')")
        messages = []
        for turn in head.split("\n\n")[1:]:
            role, _, content = turn.partition(":")
            if role not in ("Human", "Assistant"):  # a paragraph break inside a turn
                messages[-1]["content"] += "\n\n" + turn
                continue
            messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
        parsed.append((messages, answer.strip()))
    if parsed[0][0] != parsed[1][0]:
        raise ValueError(f"{where}: fields 'chosen' and 'rejected' must share the dialogue before the last answer")
    return {"prompt": parsed[0][0], "chosen": parsed[0][1], "rejected": parsed[1][1], "where": where}


# ----- tokenization -------------------------------------------------------------------------------------


def encode_example(tok: Tokenizer, prompt, response: str, max_len: int, where: str = "") -> tuple[list[int], int]:
    """Prompt through the chat template + response + EOS -> (token ids, number of prompt tokens).
    A prompt that leaves no room for a response is an error; a long response is truncated (losing EOS)."""
    prompt_ids = tok.encode(render_prompt(prompt))
    if len(prompt_ids) >= max_len:
        raise ValueError(f"{where}: field 'prompt' is {len(prompt_ids)} tokens, longer than the context "
                         f"({max_len} tokens, leaving no room for a response)")
    ids = prompt_ids + tok.encode_response(response)
    return ids[:max_len], len(prompt_ids)


def check_prompts(tok: Tokenizer, records: list[dict], block_size: int) -> None:
    """Each record's prompt must leave room in the context for an answer (read and checked at start, so that a
    long prompt is not found only when a rollout or the final evaluation draws it)."""
    for rec in records:
        n = len(tok.encode_prompt(rec["prompt"]))
        if n >= block_size:
            raise ValueError(f"{rec['where']}: field 'prompt' is {n} tokens, longer than the context "
                             f"({block_size} tokens, leaving no room for a response)")


class SequenceTable:
    """Distinct (prompt, answer) token sequences, each encoded once (`encode_example`) and numbered in the order
    first seen: .seqs [(ids, n_prompt)], .row(prompt, answer) its number. An answer ranked among K appears in K-1
    pairs (helpdesk: 4 answers, 6 pairs, 4 sequences), so per-sequence reference log-probs need 3x fewer forwards."""

    def __init__(self, tok: Tokenizer, max_len: int):
        self.tok, self.max_len, self.seqs, self.rows = tok, max_len, [], {}

    def row(self, prompt, answer: str, where: str = "") -> int:
        key = json.dumps([prompt, answer])
        if key not in self.rows:
            self.rows[key] = len(self.seqs)
            self.seqs.append(encode_example(self.tok, prompt, answer, self.max_len, where))
        return self.rows[key]


def encode_pairs(tok: Tokenizer, records: list[dict], max_len: int) -> tuple[list, list[int], list[int]]:
    """Pairs records -> (distinct (ids, n_prompt) sequences, chosen row per pair, rejected row per pair)."""
    table = SequenceTable(tok, max_len)
    chosen = [table.row(r["prompt"], r["chosen"], r.get("where", "")) for r in records]
    rejected = [table.row(r["prompt"], r["rejected"], r.get("where", "")) for r in records]
    return table.seqs, chosen, rejected


@dataclass
class Preferences:
    """Pairs or feedback records as token sequences (`encode_preferences`). Per record: `rows`, its answers' rows
    in `seqs` ((chosen, rejected) of a pair, (answer,) of a feedback record); `desirable`, their labels ((True,
    False) of a pair); `mismatched`, for KTO's reference point, the rows of each answer's prompt with another
    answer (None when not asked for)."""
    seqs: list
    rows: list[tuple]
    desirable: list[tuple]
    mismatched: list[tuple] | None = None


def encode_preferences(tok: Tokenizer, records: list[dict], max_len: int, mismatch_seed: int | None = None,
                       feedback: bool = False) -> Preferences:
    """Pairs (or, with feedback=True, feedback records) -> `Preferences`, the sequences of pairs in `encode_pairs`'s
    order.

    mismatch_seed: also give each distinct (prompt, answer) a mismatched partner for KTO's KL estimate
    (Ethayarajh et al. 2024 §4): the distinct answers in a seeded shuffle, each one's prompt with the next one's
    answer (cyclically), as TRL pairs each answer with its neighbour's in a batch. The partner is fixed per answer,
    so the estimate is the same however the batch is split over micro-batches and processes, and the reference's
    log-probs of the partners are cached with the rest. Two neighbours may share a prompt (rarely: helpdesk has
    4 answers per prompt among thousands), which only makes that term an answer to its own prompt."""
    fields = ("answer",) if feedback else ("chosen", "rejected")
    table = SequenceTable(tok, max_len)
    columns = [[table.row(r["prompt"], r[f], r.get("where", "")) for r in records] for f in fields]
    rows = list(zip(*columns))
    desirable = [(r["label"],) if feedback else (True, False) for r in records]
    if mismatch_seed is None:
        return Preferences(table.seqs, rows, desirable)
    first = {}  # each distinct row's (prompt, answer, where), as first seen
    for f, column in zip(fields, columns):
        for r, row in zip(records, column):
            first.setdefault(row, (r["prompt"], r[f], r.get("where", "")))
    order = torch.randperm(len(first), generator=torch.Generator().manual_seed(mismatch_seed)).tolist()
    partner = {}
    for i, row in enumerate(order):
        prompt, _, where = first[row]
        partner[row] = table.row(prompt, first[order[(i + 1) % len(order)]][1], where)
    return Preferences(table.seqs, rows, desirable, [tuple(partner[row] for row in rec) for rec in rows])


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> dict:
    """Right-pad (ids, n_prompt) examples -> input_ids, attention_mask, loss_mask, each [B, T].
    loss_mask is 1 on response tokens (including EOS): masks come from lengths, never from comparing ids
    with PAD."""
    T = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), T, dtype=torch.long)
    loss_mask = torch.zeros(len(examples), T)
    for b, (ids, n_prompt) in enumerate(examples):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        attention_mask[b, :len(ids)] = 1
        loss_mask[b, n_prompt:len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for generation -> (ids [B, P], attention_mask [B, P])."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), P, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, P - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[b, P - len(s):] = 1
    return ids, mask


def check_batch(n: int, batch_size: int, flag: str = "--batch_size") -> None:
    """A batch no larger than the data's n examples, or one error naming the flag (scripts call it at start,
    before the log is opened)."""
    if batch_size > n:
        raise SystemExit(f"{flag}={batch_size}: larger than the data ({n} examples); use at most {n}")


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The global batch of step `step`: a seeded permutation per epoch, so the data position is a pure
    function of the step and resuming needs no loader state."""
    check_batch(n, batch_size)
    epoch, i = divmod(step, n // batch_size)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[i * batch_size:(i + 1) * batch_size].tolist()
