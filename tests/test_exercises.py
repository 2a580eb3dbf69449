"""The exercises of docs/exercises.md, applied: each exercise's change made to a scratch copy of the repository,
and the tests its answer names run there in a fresh process, which must fail; the unchanged copy must pass the
same tests, so that each failure is the change's. Where an answer states which way a number moves and that
number is cheap to compute (a loss on a fixed batch, a reward on fixed rows), a probe prints it in the copy
before and after the change.

EXERCISES is the one list of changes: docs/exercises.md has one section per record (its heading starts with the
record's id), showing the record's file, its old and new lines as a diff, and the tests that fail;
`test_the_page_shows_every_exercise_and_only_these` holds the page to the list."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a fresh pytest process per exercise: the full suite only

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "exercises.md"
COPIED = ["nanoalign", "tests", "setup.cfg", "train_sft.py", "train_rm.py", "train_ppo.py", "train_dpo.py"]

# ----- probes: each prints one number, in the copy, before and after the change ---------------------------------

SFT_MICRO_BATCHES = """
import torch, train_sft
from nanoalign.model import GPT, GPTConfig
from nanoalign.scaffold import Process, make_optimizer
torch.manual_seed(0)
model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=8))
examples = [([3, 4, 5, 6, 7, 2], 2), ([3, 4, 9, 2], 2), ([3, 8, 8, 8, 8, 8, 8, 2], 3), ([3, 5, 2], 2)]
cfg = train_sft.Config(batch_size=4, micro_batch_size=2, max_steps=1, warmup_steps=0)
metrics, _ = train_sft.sft_step(model, make_optimizer(model, cfg.lr, 0.0), examples, 1, 0, cfg,
                                Process(0, 1, torch.device("cpu")))
print(metrics["loss"])  # the logged training loss of one step of two micro-batches
"""

REWARD_SPREAD = """
import torch
from nanoalign.data import collate
from nanoalign.model import GPT, GPTConfig
from nanoalign.sampling import reward_scores
torch.manual_seed(0)
model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=2, n_head=2, n_embd=16, scalar_head=True)).eval()
rows = collate([([3, 5, 7, 9, 2], 2), ([3, 6, 8, 10, 12, 2], 2), ([3, 13, 2], 2)], pad_id=1)
with torch.no_grad():
    r = reward_scores(model, rows["input_ids"], rows["attention_mask"])
print((r.max() - r.min()).item())  # three answers to one prompt: how far apart their rewards are
"""

KWISE_OF_A_PERFECT_RM = """
import torch
from nanoalign.losses import kwise_ranking_loss
g = torch.Generator().manual_seed(0)
ranking = torch.stack([torch.randperm(4, generator=g) for _ in range(64)])  # candidate indices, best first
rewards = (3 - torch.argsort(ranking, -1)).double()  # 3 for the best answer ... 0 for the worst: all pairs right
print(kwise_ranking_loss(rewards, ranking).item())
"""

PPO_UPDATE = """
import copy, sys, torch
sys.path.insert(0, "tests")
import train_ppo
from test_ppo_reference import BASE, CTX, fixed_rollout, gold, tiny_models
from nanoalign.scaffold import make_optimizer
train_ppo.gold_judge.judge = gold
policy, reference, rm, _ = tiny_models()
if {same_reference}:
    reference = copy.deepcopy(policy)
metrics, _ = train_ppo.ppo_update(fixed_rollout(), policy.eval(), None, reference, (rm, 1.0, 0.0),
                                  make_optimizer(policy, BASE.lr, 0.0), None, BASE.beta, None, BASE, CTX, 0)
print({metric})
"""
PPO_SCORE = PPO_UPDATE.format(same_reference=False, metric='metrics["objective/score"]')  # 3 of 8 without EOS
PPO_KL_AT_START = PPO_UPDATE.format(same_reference=True, metric='abs(metrics["objective/kl"])')  # T = 0.7

RATIO_AFTER_STEPS = """
import torch
from nanoalign.losses import ppo_policy_loss
logits = torch.zeros(1, 5, requires_grad=True)
old = logits.detach().log_softmax(-1)[:, :1]
opt = torch.optim.Adam([logits], lr=0.1)
for _ in range(30):  # 30 epochs on one token with advantage +1, ε = 0.2
    loss, _, _ = ppo_policy_loss(logits.log_softmax(-1)[:, :1], old, torch.ones(1, 1), torch.ones(1, 1), 0.2)
    opt.zero_grad()
    loss.backward()
    opt.step()
print((logits.log_softmax(-1)[0, 0] - old[0, 0]).exp().item())  # the ratio π/π_old reached
"""

VALUE_LOSS = """
import torch
from nanoalign.losses import ppo_value_loss
old, values, returns = torch.zeros(1, 3), torch.tensor([[0.5, -0.6, 0.1]]), torch.tensor([[1.0, -1.0, 0.3]])
print(ppo_value_loss(values, old, returns, torch.ones(1, 3), 0.2)[0].item())
"""

DPO_LOSS_PREFERRING_CHOSEN = """
import torch
from nanoalign.losses import Answers, LossParams, dpo_loss
ref = torch.tensor([-12.0, -12.0])
a = Answers.pairs(torch.tensor([-10.0, -12.0]), torch.tensor([-14.0, -13.0]), ref, ref)
print(dpo_loss(a, LossParams(beta=0.1))[0].mean().item())
"""

DPO_LOSS_AT_THE_START = """
import math, torch
from nanoalign.losses import Answers, LossParams, dpo_loss
s_w, s_l = torch.tensor([-30.0, -12.0]), torch.tensor([-20.0, -25.0])  # the policy is the reference
print(abs(dpo_loss(Answers.pairs(s_w, s_l, s_w, s_l), LossParams(beta=0.1))[0].mean().item() - math.log(2)))
"""

LABELS_OFF_A_TIE = """
import torch
from nanoalign import rlaif
from nanoalign.model import GPT, GPTConfig
from nanoalign.tokenizer import Tokenizer
items = [("Where is my lamp?", "Choose the kinder answer.", "It ships tomorrow.", "Go away."),
         ("Hi", "Choose the shorter answer.", "Hello there, how can I help you today?", "Hi.")]
tok = Tokenizer.train([rlaif.query(*item) for item in items] * 4 + list(rlaif.OPTIONS) * 4, vocab_size=300)
torch.manual_seed(0)
judge = GPT(GPTConfig(block_size=256, vocab_size=len(tok), n_layer=1, n_head=2, n_embd=16)).double().eval()
pref = rlaif.model_preferences(judge, tok, items)
print((rlaif.combine(pref["p_ab"], pref["p_ba"]) - 0.5).abs().max().item())  # how far the labels are from ½
"""

# ----- the exercises --------------------------------------------------------------------------------------------

PPO_REF = "tests/test_ppo_reference.py::test_ppo_update_equals_the_hand_written_reference[head]"

EXERCISES = [
    dict(id="sft-prompt-loss", stage="SFT", file="train_sft.py",
         old="    w = cfg.prompt_loss_weight  # each prompt token but the first is predicted, from the tokens "
             "before it\n",
         new="    w = 1.0  # each prompt token but the first is predicted, from the tokens before it\n",
         tests=["tests/test_sft_reference.py::test_sft_steps_equal_the_hand_written_reference[0.0]"]),
    dict(id="sft-micro-batch-mean", stage="SFT", file="train_sft.py",
         old='        loss = sft_loss(logps, batch["loss_mask"][:, 1:], n_tokens)  # this micro-batch\'s share of the '
             'global mean\n',
         new='        loss = sft_loss(logps, batch["loss_mask"][:, 1:])  # this micro-batch\'s own mean\n',
         tests=["tests/test_sft_reference.py::test_sft_steps_equal_the_hand_written_reference[0.0]"],
         probe=SFT_MICRO_BATCHES, moves="up"),
    dict(id="sft-no-eos", stage="SFT", file="nanoalign/data.py",
         old="        loss_mask[b, n_prompt:len(ids)] = 1\n",
         new="        loss_mask[b, n_prompt:len(ids) - 1] = 1\n",
         tests=["tests/test_data.py::test_collate_masks_response_and_eos_only"]),
    dict(id="rm-first-token", stage="RM", file="nanoalign/losses.py",
         old="    last = (positions * attention_mask).argmax(-1)  # [B]\n",
         new="    last = attention_mask.argmax(-1)  # [B]\n",
         tests=["tests/test_losses.py::test_last_token_values_under_left_right_and_no_padding"],
         probe=REWARD_SPREAD, moves="down", value=0.0, tol=1e-6),  # fp32 rewards ~1 from equal inputs
    dict(id="rm-ranking-as-ranks", stage="RM", file="nanoalign/losses.py",
         old="    rank = torch.argsort(ranking, dim=-1)  # [N, K]: rank of each candidate, 0 = best\n",
         new="    rank = ranking  # [N, K]: rank of each candidate, 0 = best\n",
         tests=["tests/test_preference_losses.py::test_kwise_equals_mean_over_all_pairs"],
         passes=["tests/test_preference_losses.py::test_plackett_luce_k2_is_bt_and_k3_is_sequential_softmax"],
         probe=KWISE_OF_A_PERFECT_RM, moves="up"),
    dict(id="ppo-no-kl", stage="PPO", file="train_ppo.py",
         old="    rewards = per_token_rewards(scores, kl, mask, beta)\n",
         new="    rewards = per_token_rewards(scores, kl, mask, 0.0)\n",
         tests=[PPO_REF]),
    dict(id="ppo-no-eos-penalty", stage="PPO", file="train_ppo.py",
         old="    scores = torch.where(roll.has_eos, scores, torch.full_like(scores, cfg.missing_eos_penalty))\n",
         new="",
         tests=["tests/test_ppo_reference.py::test_missing_eos_penalty_replaces_the_score"],
         probe=PPO_SCORE, moves="up"),
    dict(id="ppo-values-one-late", stage="PPO", file="nanoalign/sampling.py",
         old="        vals = vals[:, :-1]\n",
         new="        vals = vals[:, 1:]\n",
         tests=[PPO_REF], passes=[PPO_REF.replace("[head]", "[separate_critic]")]),
    dict(id="ppo-optimistic-clip", stage="PPO", file="nanoalign/losses.py",
         old="    surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))\n",
         new="    surrogate = torch.min(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))\n",
         tests=["tests/test_ppo_losses.py::test_clipped_surrogate_hand_values_and_zero_gradients"],
         probe=RATIO_AFTER_STEPS, moves="up"),
    dict(id="ppo-no-value-clip", stage="PPO", file="nanoalign/losses.py",
         old="    loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask, "
             "n_tokens)\n",
         new="    loss = 0.5 * masked_mean((values - returns) ** 2, mask, n_tokens)\n",
         tests=["tests/test_ppo_losses.py::test_clipped_value_loss_hand_values"],
         probe=VALUE_LOSS, moves="down"),
    dict(id="ppo-reference-temperature", stage="PPO", file="train_ppo.py",
         old="        ref_logps, _, _ = scored_forward(reference, ids, attn, mask, cfg.temperature)\n",
         new="        ref_logps, _, _ = scored_forward(reference, ids, attn, mask)\n",
         tests=[PPO_REF], passes=[PPO_REF.replace("[head]", "[temperature_1]")],
         probe=PPO_KL_AT_START, moves="up"),
    dict(id="dpo-flip", stage="DPO", file="nanoalign/losses.py",
         old="    h = chosen - rejected\n    eps = a.label_smoothing\n",
         new="    h = rejected - chosen\n    eps = a.label_smoothing\n",
         tests=["tests/test_preference_losses.py::test_dpo_sigmoid_hand_values_and_bt_equivalence"],
         probe=DPO_LOSS_PREFERRING_CHOSEN, moves="up"),
    dict(id="dpo-no-reference", stage="DPO", file="nanoalign/losses.py",
         old="    return a.logps - a.ref_logps\n",
         new="    return a.logps\n",
         tests=["tests/test_dpo_reference.py::test_dpo_steps_equal_the_hand_written_reference[sigmoid-kw0]"],
         passes=["tests/test_preference_losses.py::test_dpo_sigmoid_hand_values_and_bt_equivalence"],
         probe=DPO_LOSS_AT_THE_START, moves="up"),
    dict(id="dpo-cache-key", stage="DPO", file="train_dpo.py",
         old="                       template, repr(seqs), max_len, device_type, logps_code_version())\n",
         new="                       template, max_len, device_type, logps_code_version())\n",
         tests=["tests/test_guards.py::test_the_reference_cache_key_changes_with_everything_the_log_probs_depend_on"]),
    dict(id="rlaif-no-swap", stage="RLAIF", file="nanoalign/rlaif.py",
         old="    queries = [q for p, pr, y1, y2 in items for q in (query(p, pr, y1, y2), query(p, pr, y2, y1))]\n",
         new="    queries = [q for p, pr, y1, y2 in items for q in (query(p, pr, y1, y2), query(p, pr, y1, y2))]\n",
         tests=["tests/test_rlaif.py::test_both_orders_share_one_forward_and_the_options_one_query_pass"],
         probe=LABELS_OFF_A_TIE, moves="down", value=0.0, tol=1e-12),  # float64 P = ½ ± ulps
]
BY_ID = {e["id"]: e for e in EXERCISES}


def cited(node: str) -> str:
    """A test node without its parameters, as the page cites it: tests/test_x.py::test_name."""
    return node.split("[", 1)[0]


def scratch_copy(tmp_path: Path) -> Path:
    """The package, the scripts and the tests, copied: what the stated tests import and run."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, copy / name)
    return copy


def run(copy: Path, *args: str) -> subprocess.CompletedProcess:
    """A Python process in the copy, importing the copy's nanoalign and scripts."""
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True, timeout=900)


def run_tests(copy: Path, nodes: list) -> subprocess.CompletedProcess:
    return run(copy, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *nodes)


def probe(copy: Path, code: str) -> float:
    proc = run(copy, "-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return float(proc.stdout.strip().splitlines()[-1])


def apply(copy: Path, exercise: dict) -> None:
    path = copy / exercise["file"]
    text = path.read_text(encoding="utf-8")
    count = text.count(exercise["old"])
    assert count == 1, f"{exercise['id']}: the old text occurs {count} times in {exercise['file']}, not once"
    path.write_text(text.replace(exercise["old"], exercise["new"]), encoding="utf-8")


# ----- the page against the list ----------------------------------------------------------------------------------

HEADING = re.compile(r"^### ([a-z0-9-]+): \S", re.M)


def sections() -> dict:
    """docs/exercises.md's exercise sections by id: from one '### id: title' heading to the next heading."""
    text = PAGE.read_text(encoding="utf-8")
    starts = list(HEADING.finditer(text))
    out = {}
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        nxt = re.search(r"^#{1,3} ", text[m.end():end], re.M)  # a later section heading ends it too
        out[m[1]] = text[m.start():m.end() + nxt.start() if nxt else end]
    return out


def test_the_page_shows_every_exercise_and_only_these():
    """Each record has one section on the page, and each section one record; a section names the record's file,
    shows its old and new lines as a diff, asks the question and cites, in its answer, every test it runs."""
    found = sections()
    assert sorted(found) == sorted(BY_ID), (f"on the page, not in EXERCISES: {sorted(set(found) - set(BY_ID))}; "
                                            f"in EXERCISES, not on the page: {sorted(set(BY_ID) - set(found))}")
    assert len(EXERCISES) == len(BY_ID) >= 10
    assert {e["stage"] for e in EXERCISES} == {"SFT", "RM", "PPO", "DPO", "RLAIF"}
    for ex in EXERCISES:
        section = found[ex["id"]]
        assert f"`{ex['file']}`" in section, f"{ex['id']}: the section does not name `{ex['file']}`"
        diff = re.search(r"```diff\n(.*?)```", section, re.S)
        assert diff, f"{ex['id']}: no ```diff block"
        want = [f"-{line}" for line in ex["old"].splitlines()] + [f"+{line}" for line in ex["new"].splitlines()]
        assert diff[1].splitlines() == want, f"{ex['id']}: the diff is not the record's change"
        assert "What will happen?" in section and "<details>" in section and "</details>" in section, ex["id"]
        answer = section[section.index("<details>"):]
        for node in ex["tests"] + ex.get("passes", []):
            assert f"`{cited(node)}`" in answer, f"{ex['id']}: the answer does not cite `{cited(node)}`"


def test_the_unchanged_copy_passes_every_stated_test(tmp_path):
    """The stated tests pass before any change: each failure below is the change's doing."""
    nodes = sorted({node for ex in EXERCISES for node in ex["tests"]})
    proc = run_tests(scratch_copy(tmp_path), nodes)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("exercise", EXERCISES, ids=[e["id"] for e in EXERCISES])
def test_the_change_fails_the_stated_tests(exercise, tmp_path):
    copy = scratch_copy(tmp_path)
    before = probe(copy, exercise["probe"]) if "probe" in exercise else None
    apply(copy, exercise)
    proc = run_tests(copy, exercise["tests"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, f"{exercise['id']}: exit {proc.returncode}, not a test failure:\n{out[-3000:]}"
    failed = re.findall(r"^FAILED (\S+)", out, re.M)
    assert failed and all(f.split(" ")[0] in exercise["tests"] for f in failed), \
        f"{exercise['id']}: failed {failed}, stated {exercise['tests']}:\n{out[-3000:]}"
    if "passes" in exercise:  # the tests the answer says the change leaves passing
        kept = run_tests(copy, exercise["passes"])
        assert kept.returncode == 0, f"{exercise['id']}: {kept.stdout[-3000:]}{kept.stderr[-3000:]}"
    if before is not None:
        after = probe(copy, exercise["probe"])
        assert (after > before) if exercise["moves"] == "up" else (after < before), \
            f"{exercise['id']}: the probe went from {before} to {after}, not {exercise['moves']}"
        if "value" in exercise:
            assert abs(after - exercise["value"]) < exercise["tol"], f"{exercise['id']}: the probe reads {after}"
