"""Byte-level BPE tokenizer, its special tokens, and the ONE chat-template renderer every stage uses.

The chat template (one function, `render_prompt`) is what makes SFT, reward model, PPO and DPO see the same
prompt formatting: a prompt is rendered once, the response is tokenized on its own and EOS appended
(templating prompt and answer separately elsewhere doubles system prompts or BOS).

    <|system|>You are ...<|user|>Where is my order #4821?<|assistant|>Your order ...<|endoftext|>

PAD is its own token, distinct from EOS, so EOS is learned and the model stops (trl #884; N detail 2).
"""

import hashlib
import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS, PAD = "<|endoftext|>", "<|pad|>"
ROLES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [EOS, PAD, *ROLES.values()]


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids and the template nanoalign needs."""

    def __init__(self, tok: HFTokenizer):
        missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
        if missing:  # e.g. GPT-2's tokenizer.json: has EOS, lacks PAD and role markers
            tok.add_special_tokens(missing)
        self.tok = tok
        self.eos_id = tok.token_to_id(EOS)
        self.pad_id = tok.token_to_id(PAD)
        assert self.pad_id != self.eos_id

    @classmethod
    def train(cls, texts, vocab_size: int = 2048) -> "Tokenizer":
        """Train a GPT-2-style byte-level BPE on an iterable of strings."""
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Load a `tokenizer.json` file, or the one inside a checkpoint / HF directory."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: tokenizer.json not found")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
            raise ValueError(f"{path}: damaged ({e}); the file was not written completely") from None

    def save(self, path) -> None:
        self.tok.save(str(path))

    def __len__(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def hash(self) -> str:
        """sha256 of the serialised tokenizer: checkpoints record it, loaders compare it."""
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_prompt(self, prompt) -> list[int]:
        return self.encode(render_prompt(prompt))

    def encode_response(self, response: str) -> list[int]:
        """Response tokens + EOS: the model learns to stop."""
        return self.encode(response) + [self.eos_id]


def render_prompt(prompt) -> str:
    """THE chat template. `prompt` is a user message (str) or a list of {"role", "content"} messages;
    returns the text up to and including the assistant cue that the response continues."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    parts = []
    for m in messages:
        if m["role"] not in ROLES:
            raise ValueError(f"unknown role {m['role']!r}; expected one of {sorted(ROLES)}")
        # an earlier assistant turn ends with EOS, exactly as a generated response does
        parts.append(ROLES[m["role"]] + m["content"] + (EOS if m["role"] == "assistant" else ""))
    return "".join(parts) + ROLES["assistant"]


def check_tokenizer_hash(tok: Tokenizer, path) -> None:
    """A checkpoint's recorded tokenizer hash must match the tokenizer used with it."""
    meta = json.loads((Path(path) / "config.json").read_text())
    if meta.get("tokenizer_hash") not in (None, tok.hash):
        raise ValueError(f"tokenizer mismatch: {path}/config.json records tokenizer_hash "
                         f"{meta['tokenizer_hash']}, but the tokenizer in use hashes to {tok.hash}")
