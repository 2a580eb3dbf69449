"""PPO, RLOO and GRPO reach the analytic optimum of the KL-regularised objective on an enumerable task.

One prompt, answers of one token from a vocabulary of 6, a known reward r(y). With the per-token k1 penalty the
objective is E_π[r] - β KL(π‖π_ref), maximised by π*(y) ∝ π_ref(y) exp(r(y)/β) (Ziegler et al. 2019;
the DPO paper's Eq. 4). train_ppo.ppo_update, fed rollouts sampled from the current policy, must end within a
small exact KL(π‖π*) of it, far closer than the reference or the reward-greedy policy are.
"""
import copy
from dataclasses import replace

import pytest
import torch

import train_ppo
from nanoalign.model import GPT, GPTConfig
from nanoalign.scaffold import Process, make_optimizer

pytestmark = pytest.mark.slow  # hundreds of PPO updates to the analytic optimum: the full suite only

CTX = Process(0, 1, torch.device("cpu"))
REWARD = torch.tensor([0.2, -0.4, 1.0, 0.5, 0.0, -0.5], dtype=torch.float64)  # r(y) for the 6 tokens
PROMPT = 3


def policy_probs(model):
    with torch.no_grad():
        return model(torch.tensor([[PROMPT]]))[0, -1].double().softmax(-1)


def exact_kl(p, q):
    return (p * (p.log() - q.log())).sum().item()


@pytest.mark.parametrize("variant", [dict(advantage="gae"), dict(advantage="rloo", samples_per_prompt=4),
                                     dict(advantage="grpo", samples_per_prompt=4)])
def test_rl_converges_to_pi_ref_times_exp_reward_over_beta(variant, monkeypatch):
    monkeypatch.setattr(train_ppo, "reward_scores", lambda rm, ids, attn, gain, bias: REWARD[ids[:, -1]])
    monkeypatch.setattr(train_ppo.gold_judge, "judge", lambda prompt, answer: {"gold": 0.0})
    torch.manual_seed(0)
    policy = GPT(GPTConfig(block_size=4, vocab_size=6, n_layer=1, n_head=1, n_embd=8, scalar_head=True)).double()
    with torch.no_grad():
        policy.lm_head.weight.mul_(8.0)  # a reference far from uniform, so the optimum is not just r's softmax
    policy.reset_scalar_head(std=0.0)
    reference = copy.deepcopy(policy).requires_grad_(False)
    cfg = replace(train_ppo.Config(), n_updates=150, rollout_size=64, minibatches=2, ppo_epochs=2, lr=2e-2,
                  beta=0.5, vf_coef=0.5, temperature=1.0, **variant)
    pi_ref = policy_probs(reference)
    target = pi_ref * torch.exp(REWARD / cfg.beta)
    target = target / target.sum()
    optimizer = make_optimizer(policy, cfg.lr, 0.0, eps=cfg.adam_eps)
    g = torch.Generator().manual_seed(1)
    for update in range(cfg.n_updates):
        answers = torch.multinomial(policy_probs(policy).float(), cfg.rollout_size, replacement=True, generator=g)
        ids = torch.stack([torch.full_like(answers, PROMPT), answers], 1)  # [B, 2]: prompt, answer
        roll = train_ppo.Rollout([""] * cfg.rollout_size, [""] * cfg.rollout_size, ids, torch.ones_like(ids),
                                 torch.ones(cfg.rollout_size, 1, dtype=torch.float64),
                                 torch.ones(cfg.rollout_size, dtype=torch.bool))  # every answer "stopped"
        policy.eval()
        train_ppo.ppo_update(roll, policy, None, reference, (None, 1.0, 0.0), optimizer, None, cfg.beta, None, cfg,
                             CTX, update)
    pi = policy_probs(policy)
    greedy = torch.full_like(pi, 1e-6).index_fill(0, REWARD.argmax()[None], 1.0)
    greedy = greedy / greedy.sum()
    assert exact_kl(pi_ref, target) > 0.3 and exact_kl(greedy, target) > 0.3  # the start and a wrong answer
    # stochastic optimisation: 150 updates on 64 samples each leave sampling noise in the logits (KL ~1e-3 to
    # the target); 0.01 is far below the start's and a wrong answer's KL (> 0.3)
    assert exact_kl(pi, target) < 0.01, (pi.tolist(), target.tolist())
