"""The helpdesk world's files, prompts and answers from `nanoalign.world.helpdesk` scored by
`nanoalign.world.gold_judge`: `write_world` writes them, `ensure_world` writes them when a script's --data_dir does
not hold them yet."""

import random
from itertools import combinations
from pathlib import Path

import torch.distributed as dist

from nanoalign.data import write_jsonl
from nanoalign.world import gold_judge, helpdesk


def write_world(data_dir, seed: int = 0, n_train: int = 4000, n_test: int = 200) -> None:
    """Write the helpdesk world (`nanoalign.world.helpdesk`) into data_dir: sft (a demonstration per prompt), prefs (K
    candidates, their gold scores and a noisy ranking), pairs (each ranking's C(K,2) pairs), feedback (a thumbs up
    or down per candidate, `thumbs`) and prompts, for the training prompts and, with the suffix _test, the held-out
    ones."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    for suffix, prompts in zip(("", "_test"), helpdesk.split_prompts(seed, n_train, n_test)):
        demo_rng, prefs_rng = random.Random(f"{seed}/{suffix}/sft"), random.Random(f"{seed}/{suffix}/prefs")
        sft = [{"prompt": p, "completion": helpdesk.demonstration(p, demo_rng)} for p in prompts]
        prefs, pairs, feedback = [], [], []
        for p in prompts:
            responses = helpdesk.candidates(p, prefs_rng)
            gold = [gold_judge.judge(p, r)["gold"] for r in responses]
            ranking = helpdesk.noisy_ranking(gold, prefs_rng)
            prefs.append({"prompt": p, "responses": responses, "ranking": ranking,
                          "gold": [round(g, 4) for g in gold]})
            pairs += [{"prompt": p, "chosen": responses[a], "rejected": responses[b]}
                      for a, b in combinations(ranking, 2)]
            feedback += thumbs(p, responses, ranking)
        write_jsonl(data_dir / f"sft{suffix}.jsonl", sft)
        write_jsonl(data_dir / f"prefs{suffix}.jsonl", prefs)
        write_jsonl(data_dir / f"pairs{suffix}.jsonl", pairs)
        write_jsonl(data_dir / f"feedback{suffix}.jsonl", feedback)
        write_jsonl(data_dir / f"prompts{suffix}.jsonl", [{"prompt": p} for p in prompts])


def thumbs(prompt, responses: list[str], ranking: list[int]) -> list[dict]:
    """Unpaired feedback from one ranking: the upper half of the ranked candidates a thumbs up, the lower half a
    thumbs down (the middle one of an odd K neither), each a {"prompt", "answer", "label"} record in the
    candidates' order. It reads the same noisy ranking as the pairs, so KTO on it and DPO on the pairs learn from
    one labeller; what it drops is which answer beat which."""
    position = {i: k for k, i in enumerate(ranking)}
    half = len(ranking) // 2
    return [{"prompt": prompt, "answer": r, "label": position[i] < half} for i, r in enumerate(responses)
            if position[i] < half or position[i] >= len(ranking) - half]


def ensure_world(data_dir, needed: str, seed: int, proc) -> None:
    """Write the helpdesk world into data_dir if `needed` (a file name) is missing there and data_dir is missing or
    empty: rank 0 writes, all wait. A folder that holds other files is someone's own data, never written over: it
    is refused with one error (the world holds every file a script reads, so a folder with all of them never gets
    here)."""
    path = Path(data_dir)
    if (path / needed).exists():
        return
    if proc.master:
        held = sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) if path.is_dir() else []
        if held:
            raise SystemExit(f"--data_dir={data_dir}: no {needed}, and the folder holds other files "
                             f"({', '.join(held[:5])}{', ...' if len(held) > 5 else ''}): the helpdesk world is "
                             f"written only into a missing or empty folder; add {needed} or choose another --data_dir")
        write_world(data_dir, seed=seed)
    if proc.world > 1:
        dist.barrier()
