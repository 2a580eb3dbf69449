"""A run's log: one progress line per call on rank 0, and every metric appended to out_dir/log.jsonl (on resume, the
lines after the checkpoint are dropped, so the log reads as if the run had never stopped).

Opening the log is a run's first write in out_dir, so it is where a folder is kept to one run: a new run first
moves a previous run's files aside whole (`checkpoint.move_aside`: out_dir/.prev-N), and a resumed run removes its
eval.json, which was of an earlier state and is written again when the run ends."""

import json
import time
from pathlib import Path

from nanoalign.checkpoint import move_aside


class Logger:
    """Rank 0 prints one progress line per call and appends every metric to out_dir/log.jsonl."""

    def __init__(self, out_dir, proc, max_steps: int, resume_step: int = 0):  # proc: scaffold.Process (rank 0 writes)
        """resume_step: the step of the checkpoint a resumed run continues from; 0 for a new run."""
        self.path = Path(out_dir) / "log.jsonl"
        self.master, self.max_steps = proc.master, max_steps
        self.t0, self.step0 = time.time(), resume_step
        if self.master:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not resume_step and (aside := move_aside(out_dir)):
                print(f"{out_dir} held a previous run: moved aside to {aside}")
            kept = []
            if resume_step and self.path.exists():  # drop lines logged after the checkpoint we resume from
                lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
                for n, line in enumerate(lines, 1):
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        if n < len(lines):
                            raise ValueError(f"{self.path}:{n}: damaged log line (not JSON) before the last one")
                        print(f"{self.path}:{n}: dropped a torn last line (the run was killed while writing it)")
                        continue
                    if record["step"] <= resume_step:
                        kept.append(line)
            if resume_step:
                (self.path.parent / "eval.json").unlink(missing_ok=True)  # of an earlier state of this run
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(l + "\n" for l in kept))
            tmp.replace(self.path)

    def log(self, step: int, metrics: dict, tokens_per_s: float | None = None) -> None:
        if not self.master:
            return
        elapsed = time.time() - self.t0
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": round(elapsed, 3), **metrics}) + "\n")
        done = max(1, step - self.step0)
        eta = elapsed / done * (self.max_steps - step)
        shown = " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        speed = f" | {tokens_per_s / 1e3:.1f}k tok/s" if tokens_per_s else ""
        print(f"step {step:5d}/{self.max_steps} | {shown}{speed} | eta {int(eta) // 60}m{int(eta) % 60:02d}s",
              flush=True)
