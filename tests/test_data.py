"""Reading, validating, tokenizing and collating data."""

import json

import pytest
import torch

from nanoalign.data import (batch_indices, collate, encode_example, encode_pairs, encode_preferences, left_pad,
                            n_rankings, read_jsonl, read_rankings)
from nanoalign.tokenizer import Tokenizer
from nanoalign.world.files import thumbs


def write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


GOOD = {"prompt": "Where is my order?", "completion": "It shipped."}

BAD = [  # (lines, schema, message fragment): each names the file, the line and the field
    (["{not json"], "sft", r":1: malformed JSON"),
    ([GOOD, {"prompt": "Hi"}], "sft", r":2: missing field 'completion'"),
    ([{"prompt": "Hi", "completion": ""}], "sft", r":1: field 'completion' is empty"),
    ([{"prompt": "Hi", "completion": 3}], "sft", r":1: field 'completion' must be a string, got int"),
    ([{"prompt": ["Hi"], "completion": "ok"}], "sft", r":1: field 'prompt\[0\]' must be"),
    ([{"question": "Hi", "answer": "ok"}], None, r":1: unknown schema"),
    ([[1, 2]], "sft", r":1: expected a JSON object"),
    ([{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}], "prefs", r":1: field 'ranking'"),
    ([{"prompt": "p", "responses": ["a"], "ranking": [0]}], "prefs", r":1: field 'responses'"),
    ([{"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0], "gold": [0.5]}], "prefs", r":1: field 'gold'"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b", "p": 1.5}], "pairs", r":1: field 'p'"),
    ([{"prompt": "p", "chosen": "a", "rejected": ["b"]}], "pairs", r":1: field 'rejected' must be a string"),
    ([{"chosen": "no human turn", "rejected": "x"}], "hh", r":1: field 'chosen' is not HH text"),
    ([{"prompt": "p", "answer": "a", "label": True}, {"prompt": "p", "answer": "b", "label": "yes"}], "feedback",
     r":2: field 'label' must be true \(a thumbs up\) or false \(a thumbs down\), got 'yes'"),
    ([{"prompt": "p", "answer": "a", "label": 1}], "feedback", r":1: field 'label' must be true"),
    ([{"prompt": "p", "answer": "a"}], "feedback", r":1: missing field 'label'"),
    ([{"prompt": "p", "answer": " ", "label": False}], "feedback", r":1: field 'answer' is empty"),
    ([GOOD, "", "[]"], "sft", r":3: expected a JSON object"),
]


@pytest.mark.parametrize("lines,schema,match", BAD)
def test_bad_input_names_file_line_and_field(tmp_path, lines, schema, match):
    path = write(tmp_path, lines)
    with pytest.raises(ValueError, match=match) as err:
        read_jsonl(path, schema)
    assert str(path) in str(err.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="empty file"):
        read_jsonl(write(tmp_path, []), "sft")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_prompt_longer_than_context_is_an_error(tmp_path):
    tok = Tokenizer.train(["word " * 50], vocab_size=270)
    rec = read_jsonl(write(tmp_path, [{"prompt": "word " * 40, "completion": "ok"}]), "sft")[0]
    with pytest.raises(ValueError, match=r"data.jsonl:1: field 'prompt' is \d+ tokens, longer than the context"):
        encode_example(tok, rec["prompt"], rec["completion"], 16, rec["where"])


def test_schema_detection_and_hh_parsing(tmp_path):
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Refund?\n\nAssistant: Sure, here is how.",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Refund?\n\nAssistant: No."}
    rec = read_jsonl(write(tmp_path, [hh]))[0]
    assert rec["prompt"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": "Refund?"}]
    assert (rec["chosen"], rec["rejected"]) == ("Sure, here is how.", "No.")
    diverging = dict(hh, rejected="\n\nHuman: Bye\n\nAssistant: No.")
    with pytest.raises(ValueError, match="share the dialogue"):
        read_jsonl(write(tmp_path, [diverging]))
    assert read_jsonl(write(tmp_path, [GOOD]))[0]["where"].endswith("data.jsonl:1")


def test_collate_masks_response_and_eos_only():
    batch = collate([([5, 6, 7, 8, 2], 2), ([5, 9, 2], 2)], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 2], [5, 9, 2, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]]  # EOS (2) weight 1, PAD 0
    ids, mask = left_pad([[4, 5, 6], [7]], pad_id=1)
    assert ids.tolist() == [[4, 5, 6], [1, 1, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batch_indices_cover_each_epoch_once_and_are_pure():
    seen = sum((batch_indices(20, 5, s, seed=3) for s in range(4)), [])
    assert sorted(seen) == list(range(20))
    assert batch_indices(20, 5, 6, seed=3) == batch_indices(20, 5, 6, seed=3)
    assert sorted(sum((batch_indices(20, 5, s, seed=3) for s in range(4, 8)), [])) == list(range(20))
    assert torch.tensor(batch_indices(20, 5, 4, 3)).tolist() != batch_indices(20, 5, 0, 3)


def test_rankings_read_back_without_where_and_counted_in_pairs(tmp_path):
    ranking = {"prompt": "p", "responses": ["a", "b", "c", "d"], "ranking": [2, 0, 3, 1], "gold": [0.1, 0, 0.9, 0.2]}
    path = write(tmp_path, [ranking, ranking])
    assert "where" in read_jsonl(path, "prefs")[0] and read_rankings(path) == [ranking, ranking]
    assert [n_rankings(n, 4) for n in (250, 1000, 16000, 2)] == [42, 167, 2667, 1]  # C(4,2) = 6 pairs each
    assert n_rankings(9, 3) == 3 and n_rankings(10, 2) == 10


def test_feedback_is_the_rankings_upper_half_up_and_lower_half_down(tmp_path):
    """K = 4: the two best-ranked candidates a thumbs up, the two worst a thumbs down; an odd K leaves out the
    middle one. Records come in the candidates' order and read back as the feedback schema (detected)."""
    up_down = thumbs("p", ["a", "b", "c", "d"], [2, 0, 3, 1])
    assert up_down == [{"prompt": "p", "answer": a, "label": l} for a, l in zip("abcd", (True, False, True, False))]
    assert [r["answer"] for r in thumbs("p", ["a", "b", "c"], [1, 2, 0])] == ["a", "b"]  # c (middle) left out
    assert [r["label"] for r in thumbs("p", ["a", "b", "c"], [1, 2, 0])] == [False, True]
    assert read_jsonl(write(tmp_path, up_down))[0]["label"] is True


def test_encoded_preferences_keep_pairs_order_and_give_each_answer_another_answer(tmp_path):
    """Pairs encode as `encode_pairs` does; with a mismatch seed every distinct answer's prompt meets one other
    distinct answer, all of them in one cycle (a rotation of a shuffle), the same for the same seed."""
    tok = Tokenizer.train(["Where is order 12? It ships. It is lost. Go away."] * 4, vocab_size=280)
    pairs = [{"prompt": f"Where is order {i}?", "chosen": f"It ships {i}.", "rejected": f"It is lost {i}."}
             for i in range(5)]
    seqs, chosen, rejected = encode_pairs(tok, pairs, 64)
    prefs = encode_preferences(tok, pairs, 64)
    assert prefs.seqs == seqs and prefs.rows == list(zip(chosen, rejected)) and prefs.mismatched is None
    assert prefs.desirable == [(True, False)] * 5
    kto = encode_preferences(tok, pairs, 64, mismatch_seed=3)
    assert kto.seqs[:len(seqs)] == seqs and kto.rows == prefs.rows
    partner_answer = {}  # each answer's row -> the row of the answer its prompt is paired with
    for rows, partners in zip(kto.rows, kto.mismatched):
        for row, partner in zip(rows, partners):
            assert kto.seqs[partner][0][:kto.seqs[partner][1]] == seqs[row][0][:seqs[row][1]]  # its own prompt
            answer = kto.seqs[partner][0][kto.seqs[partner][1]:]
            partner_answer[row] = next(r for r, (ids, n) in enumerate(seqs) if ids[n:] == answer)
    assert sorted(partner_answer) == list(range(len(seqs))) and all(a != b for a, b in partner_answer.items())
    row, cycle = 0, []
    for _ in range(len(seqs)):
        cycle.append(row)
        row = partner_answer[row]
    assert sorted(cycle) == list(range(len(seqs)))  # one cycle through every answer
    assert encode_preferences(tok, pairs, 64, mismatch_seed=3).mismatched == kto.mismatched
    feedback = [{"prompt": "Where is order 1?", "answer": "It ships 1.", "label": True},
                {"prompt": "Where is order 2?", "answer": "It is lost 2.", "label": False}]
    assert encode_preferences(tok, feedback, 64, feedback=True).desirable == [(True,), (False,)]
