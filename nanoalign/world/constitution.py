"""The constitution and what the AI feedback model is asked and taught (Bai et al. 2022, Constitutional AI §4.1).

A constitution is a plain file of principles, each tied to one of the gold judge's scores (`read_constitution`).
A comparison query (`query`) puts the customer's message, one principle and two answers as (A) and (B) to the
feedback model, whose verdict is read from the two option strings (`OPTIONS`). For the helpdesk world the
feedback model learns from a judging corpus (`write_judge_corpus`) whose verdicts come from each principle's
gold score alone. nanoalign.rlaif asks the queries and writes the labels.
"""

import random
from dataclasses import dataclass
from pathlib import Path

from nanoalign.data import read_jsonl, write_jsonl
from nanoalign.world import gold_judge, helpdesk
from nanoalign.world.grammar import sentences

CONSTITUTION = Path(__file__).with_name("constitution.txt")
OPTIONS = ("(A)", "(B)")
SCORES = (*gold_judge.PRINCIPLES, "gold")  # what a principle may name as its gold score

# ----- principles and the query -------------------------------------------------------------------------


@dataclass(frozen=True)
class Principle:
    score: str  # the gold judge's score that teaches and measures it
    text: str  # the instruction the feedback model reads


def read_constitution(path=None) -> list[Principle]:
    """Principles from a file of "<score>: <instruction>" lines ('#' comments and blank lines skipped). An unknown
    score, an empty instruction, a duplicate, or fewer than two principles is an error naming the file and line."""
    path = Path(path or CONSTITUTION)
    principles, seen = [], {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        score, sep, text = (part.strip() for part in line.partition(":"))
        where = f"{path}:{n}"
        if not sep or score not in SCORES:
            raise ValueError(f"{where}: expected '<score>: <instruction>' with score one of {', '.join(SCORES)}; "
                             f"got {line!r}")
        if not text:
            raise ValueError(f"{where}: empty principle")
        if text.lower() in seen:
            raise ValueError(f"{where}: duplicate principle, first at line {seen[text.lower()]}")
        seen[text.lower()] = n
        principles.append(Principle(score, text))
    if len(principles) < 2:
        raise ValueError(f"{path}: {len(principles)} principle(s); a constitution needs at least 2")
    return principles


def query(prompt: str, principle: str, answer_a: str, answer_b: str) -> str:
    """The comparison query, a user message; render_prompt (the shared chat template) adds the assistant cue."""
    return (f"Customer: {prompt}\nPrinciple: {principle}\n(A) {answer_a}\n(B) {answer_b}\n"
            f"Which answer follows the principle better?")


def option_ids(tok, source: str = "the feedback model") -> tuple[list[int], list[int]]:
    """The two options as response tokens (+ EOS). They must split alike, position by position, so that their
    log-probs compare like for like; a tokenizer that splits them differently is an error."""
    a, b = (tok.encode_response(o) for o in OPTIONS)
    if len(a) != len(b) or sum(x != y for x, y in zip(a, b)) != 1:
        raise ValueError(f"{source}: its tokenizer splits the options differently: {OPTIONS[0]!r} -> {a}, "
                         f"{OPTIONS[1]!r} -> {b}; they must differ in exactly one token")
    return a, b


def principle_score(score: str, prompt: str, answer: str) -> float:
    """The gold judge's score that a principle names (the judging corpus and the measurements use it)."""
    if score == "gold":
        return gold_judge.judge(prompt, answer)["gold"]
    return gold_judge.PRINCIPLE_FNS[score](prompt, answer)


# ----- the judging corpus (helpdesk world) -----------------------------------------------------------------


def garble(answer: str, rng: random.Random) -> str:
    """A policy-like failure of a generated answer: cut off mid-sentence (the length limit), or one sentence's
    words shuffled, or a sentence said twice; the judging corpus needs incoherent and rambling answers too."""
    words = answer.split()
    kind = rng.choice(("cut", "shuffle", "repeat"))
    if kind == "cut" and len(words) > 3:
        return " ".join(words[:rng.randrange(2, len(words) - 1)])
    said = sentences(answer)
    if kind == "shuffle" and said:
        i = rng.randrange(len(said))
        shuffled = said[i].split()
        rng.shuffle(shuffled)
        said[i] = " ".join(shuffled)
        return " ".join(said)
    return " ".join(said + said[-1:]) if said else answer


def judge_corpus(principles: list[Principle], prompts, n: int, rng: random.Random) -> list[dict]:
    """n comparison queries in the sft format, the principles in turn: for each, prompts are drawn from `prompts`
    (an iterator) until two of a prompt's answers (generated, or garbled) differ in that principle's gold score;
    the verdict "(A)" or "(B)" follows that score alone, the better answer in either slot at random."""
    records = []
    while len(records) < n:
        principle = principles[len(records) % len(principles)]
        for _ in range(500):
            p = next(prompts)
            answers = helpdesk.candidates(p, rng) + [helpdesk.demonstration(p, rng)]
            answers.append(garble(rng.choice(answers), rng))
            scored = [(principle_score(principle.score, p, y), y) for y in answers]
            differ = [(x, y) for x in scored for y in scored if x[0] > y[0]]
            if differ:
                better, worse = rng.choice(differ)
                a, b = (better, worse) if rng.random() < 0.5 else (worse, better)
                records.append({"prompt": query(p, principle.text, a[1], b[1]), "completion": OPTIONS[a is worse],
                                "principle": principle.text})
                break
        else:
            raise ValueError(f"principle {principle.text!r} ({principle.score}) told no answers apart in 500 prompts")
    return records


def write_judge_corpus(data_dir, principles: list[Principle], n_train: int, n_test: int, seed: int) -> Path:
    """data_dir/judge/{sft,sft_test}.jsonl on fresh draws of the world's prompts, never its held-out test prompts
    (the policies are measured there). The prompt space is small (about 100 distinct competitor prompts, and
    the training set holds nearly all of them), so the judge's prompts do overlap the policy's training prompts;
    its answers never overlap the policy's samples: they come from the answer generator."""
    data_dir = Path(data_dir)
    held_out = {r["prompt"] for r in read_jsonl(data_dir / "prompts_test.jsonl", "prompts")}
    rng = random.Random(f"{seed}/judge")
    fresh = (p for p in helpdesk.prompt_stream(f"judge/{seed}") if p not in held_out)
    out = data_dir / "judge"
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("sft_test.jsonl", n_test), ("sft.jsonl", n_train)):
        records = judge_corpus(principles, fresh, n, rng)
        write_jsonl(out / name, records)
    return out
