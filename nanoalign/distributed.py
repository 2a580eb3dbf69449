"""The data-parallel bookkeeping of an on-policy loop (train_ppo.py), kept out of the loop: which episodes of the
global rollout this rank samples and with which generators, how minibatches are dealt, and statistics over every
rank's episodes.

In one process each function is the plain thing: the whole rollout, a shuffle into minibatches, a sum, a mean.
Under torchrun each rank samples a contiguous share of the global rollout (whole prompts, so RLOO / GRPO groups
stay on one rank) with one generator per episode, its minibatches hold its rows of the same global minibatches,
and sums, means and variances (whitening, the loss normalisation, the gold normalisation, the logs) run over all
ranks' episodes: 1 and N processes sample the same episodes and take the same steps.
"""

import torch

from nanoalign.scaffold import global_sum


def rank_share(rows: int, proc) -> range:
    """This rank's contiguous share of a global batch of `rows` episodes (all of them in one process)."""
    share = rows // proc.world
    return range(proc.rank * share, (proc.rank + 1) * share)


def row_generators(seed: int, update: int, rows: range, rollout_size: int, device) -> list:
    """One sampling generator per episode (global row of the rollout), seeded from (seed, update, row): an
    episode's answer is the same for any world size and whichever rows share its batch (N detail 6's
    seed + 100003·rank, per episode)."""
    return [torch.Generator(device=device).manual_seed(seed + 100003 * (update * rollout_size + row)) for row in rows]


def deal_minibatches(rows: int, n: int, seed: int, proc) -> list[torch.Tensor]:
    """This rank's rows of each of n minibatches. Each run of n consecutive global rows is dealt at random over
    the n minibatches, one row to each, by the same draw on every rank: a minibatch holds the same episodes for
    any world size, and each rank's `rows` (a multiple of n) split evenly over the minibatches."""
    deal = torch.rand(rows * proc.world // n, n, generator=torch.Generator().manual_seed(seed)).argsort(-1)
    mine = deal.flatten()[proc.rank * rows:(proc.rank + 1) * rows]  # the minibatch of each of this rank's rows
    return [(mine == j).nonzero()[:, 0] for j in range(n)]


def all_sum(proc):
    """x -> x summed over every rank (a number or a tensor; x itself in one process): the `all_sum` that
    `losses.whiten` and `losses.reward_normalisation` take."""
    return lambda x: global_sum(x, proc)


def global_total(x: torch.Tensor, proc) -> float:
    """Sum of x's entries over every rank's entries: with x a response mask, the global count of its tokens."""
    return global_sum(x.sum().item(), proc)


def global_mean(x: torch.Tensor, proc) -> float:
    """Mean of x's entries over every rank's entries."""
    return global_total(x, proc) / global_sum(x.numel(), proc)


def global_var(x: torch.Tensor, proc) -> float:
    """Unbiased variance of x's entries over every rank's entries (torch.var's convention), in two passes."""
    mean = global_mean(x, proc)
    return global_sum(((x - mean) ** 2).sum().item(), proc) / (global_sum(x.numel(), proc) - 1)
