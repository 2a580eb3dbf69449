"""One PPO iteration of the default helpdesk run split into rollout / scoring / training time.

    python bench/ppo_step.py        # needs out/sft and out/rm (python train_sft.py; python train_rm.py)

Runs train_ppo.py's own loop (default config: 64 episodes, up to 64 new tokens, 4 epochs x 2 minibatches) for a
few updates and reports the mean seconds of each phase over the updates after the first (train_ppo.py logs them
as time/rollout: sampling; time/score: reward model, gold judge, old / reference / value forwards, advantages;
time/train: the PPO epochs).
"""

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common import machine, write_json
from nanoalign.config import check_config, parse_config


@dataclass
class Config:
    updates: int = 4
    out: str = "bench/ppo_step.json"


def main(cfg: Config) -> dict:
    check_config(cfg, positive="updates")
    with tempfile.TemporaryDirectory() as d:
        script = Path(__file__).resolve().parents[1] / "train_ppo.py"
        subprocess.run([sys.executable, str(script), f"--n_updates={cfg.updates}", "--n_eval=0", f"--out_dir={d}"],
                       check=True)
        logs = [json.loads(l) for l in (Path(d) / "log.jsonl").read_text().splitlines()][1:]
    phases = {k: sum(r[f"time/{k}"] for r in logs) / len(logs) for k in ("rollout", "score", "train")}
    total = sum(phases.values())
    result = {"machine": machine(), "updates_timed": len(logs), "seconds": phases, "total_s": total,
              "share": {k: v / total for k, v in phases.items()},
              "response_length": sum(r["response/length"] for r in logs) / len(logs)}
    write_json(cfg.out, result)
    print("ppo_step: " + ", ".join(f"{k} {v:.2f}s ({v / total:.0%})" for k, v in phases.items())
          + f" | {total:.2f}s per update of 64 episodes")
    return result


if __name__ == "__main__":
    main(parse_config(Config))
