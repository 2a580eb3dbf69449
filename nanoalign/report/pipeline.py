"""The pipeline behind `python -m nanoalign.report`: its stages, and which of them must run again.

Each stage is one command of the repository's scripts with their defaults, the commands of docs/results.md,
run as a child process (the package imports no script) that dies with the report, even of a SIGKILL
(`scaffold.die_with_parent`). A stage is reused when out/report/stages.json says
that the report ran it with the same command, code and inputs, and its files have not changed since; otherwise
it runs again, and the line that says so says why: no run there, a partial run, a run the report did not make,
changed files, changed code, or an input that was rerun.
"""

import ast
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nanoalign.checkpoint import in_use, locked, move_aside, run_entries
from nanoalign.evaluate import write_json
from nanoalign.scaffold import die_with_parent

ROOT = Path(__file__).resolve().parents[2]  # the repository: its scripts and the package's code
WORLD = tuple(f"{{data}}/{kind}{split}.jsonl"  # the helpdesk world's files, written by the sft stage when missing
              for kind in ("sft", "prefs", "pairs", "prompts") for split in ("", "_test"))


@dataclass(frozen=True)
class Stage:
    title: str  # the stage's name in the report
    legend: str  # its command in a figure's legend: the script and the flags that set it apart
    argv: tuple  # after `python`: a script (or -m module) and its flags; {out} and {data} are filled in
    needs: tuple  # the stages whose outputs it reads
    result: str  # the file it writes last, in its directory: the report reads it
    seconds: float  # wall time of the default run on 2 CPU cores (the ETA until this machine has timed it)
    quick: tuple = ()  # flags added by --quick: tiny models and few steps
    also_writes: tuple = ()  # outputs outside its directory
    also_runs: tuple = ()  # code it runs or reads besides its entry point's imports (a script in a child process)
    rebuilds: tuple = ()  # outputs it would reuse if present, removed before it runs so that they are made anew


_EVAL = ("--n_eval=8", "--max_new_tokens=16")  # --quick: a few short held-out answers
_PPO = ("--n_updates=2", "--rollout_size=8", "--n_eval=8", "--max_new_tokens=16", "--eval_max_new_tokens=16")
_RM = ("--epochs=1", "--batch_size=16", "--n_norm=8", "--max_new_tokens=16")
STAGES = {
    "sft": Stage(
        title="SFT", legend="train_sft.py", needs=(), result="eval.json", seconds=165,
        argv=("train_sft.py", "--data_dir={data}", "--out_dir={out}/sft"), also_writes=WORLD,
        quick=("--max_steps=4", "--batch_size=8", "--n_layer=1", "--n_embd=32", "--n_head=2", "--vocab_size=320",
               "--log_interval=2", *_EVAL)),
    "rm": Stage(
        title="reward model", legend="train_rm.py", needs=("sft",), result="eval.json", seconds=150,
        argv=("train_rm.py", "--data_dir={data}", "--init_from={out}/sft", "--out_dir={out}/rm"), quick=_RM),
    "bon": Stage(  # the first 100 held-out prompts: the best-of-N curve and the realised best-of-8 policy
        title="best-of-8 (SFT + RM)", legend="evaluate --best_of_n=64", needs=("sft", "rm"),
        result="best_of_n.json", seconds=25,
        argv=("-m", "nanoalign.evaluate", "--checkpoint={out}/sft", "--reward_model={out}/rm", "--best_of_n=64",
              "--n=100", "--seed=1234", "--data_dir={data}", "--out={out}/bon"),
        quick=("--n=8", "--n_bon=3", "--best_of_n=4", "--select=2", "--max_new_tokens=16")),
    "dpo": Stage(
        title="DPO", legend="train_dpo.py", needs=("sft",), result="eval.json", seconds=95,
        argv=("train_dpo.py", "--data_dir={data}", "--init_from={out}/sft", "--cache_dir={out}/cache",
              "--out_dir={out}/dpo"), quick=("--max_steps=3", "--batch_size=8", *_EVAL)),
    "ppo": Stage(
        title="PPO", legend="train_ppo.py", needs=("sft", "rm"), result="eval.json", seconds=116,
        argv=("train_ppo.py", "--data_dir={data}", "--init_from={out}/sft", "--reward_model={out}/rm",
              "--out_dir={out}/ppo"), quick=_PPO),
    "rlaif": Stage(
        title="AI feedback labels", legend="python -m nanoalign.rlaif", needs=("sft",), result="eval.json",
        seconds=610, argv=("-m", "nanoalign.rlaif", "--data_dir={data}", "--policy={out}/sft", "--judge={out}/judge",
                           "--out={data}/ai_pairs.jsonl", "--eval_dir={out}/rlaif"),
        also_writes=("{out}/judge", "{data}/ai_pairs.jsonl"),
        also_runs=("train_sft.py", "nanoalign/world/constitution.txt"),
        rebuilds=("{out}/judge", "{data}/judge"),  # the feedback model and its corpus: the world or code may differ
        quick=("--n_prompts=8", "--judge_train=64", "--judge_steps=2", "--max_new_tokens=16")),
    "rm_rlaif": Stage(
        title="reward model (AI labels)", legend="train_rm.py --pairs_file=ai_pairs.jsonl", needs=("sft", "rlaif"),
        result="eval.json", seconds=90,
        argv=("train_rm.py", "--data_dir={data}", "--init_from={out}/sft", "--data=pairs",
              "--pairs_file=ai_pairs.jsonl", "--soft_labels=True", "--out_dir={out}/rm_rlaif"), quick=_RM),
    "ppo_rlaif": Stage(
        title="RLAIF → RM → PPO", legend="train_ppo.py --reward_model=out/rm_rlaif", needs=("sft", "rm_rlaif"),
        result="eval.json", seconds=116,
        argv=("train_ppo.py", "--data_dir={data}", "--init_from={out}/sft", "--reward_model={out}/rm_rlaif",
              "--out_dir={out}/ppo_rlaif"), quick=_PPO),
    "ppo_hack": Stage(
        title="PPO without a KL penalty", legend="train_ppo.py --beta=0 --n_updates=200 --lr=1e-4",
        needs=("sft", "rm"), result="eval.json", seconds=410,
        argv=("train_ppo.py", "--data_dir={data}", "--init_from={out}/sft", "--reward_model={out}/rm", "--beta=0",
              "--n_updates=200", "--lr=1e-4", "--out_dir={out}/ppo_hack"), quick=(*_PPO, "--n_updates=3")),
}
DEFAULT = ("sft", "rm", "bon", "dpo", "ppo")


@dataclass
class Config:
    stages: str = "default"  # comma-separated (with the stages they need): default = sft,rm,bon,dpo,ppo; all
    out_root: str = "out"  # each stage's directory, and report/ with index.md, its figures and stages.json
    data_dir: str = "data"  # the helpdesk world (the sft stage writes it when missing)
    force: str = ""  # comma-separated stages to rerun even when current ("all": every one)
    jobs: int = 2  # stages run side by side when neither reads the other (1: one at a time)
    quick: bool = False  # tiny models and a few steps per stage: checks the wiring in seconds, the numbers mean nothing


def selected(stages: str) -> list[str]:
    """The stages asked for and every stage they need, in pipeline order."""
    names = {"default": list(DEFAULT), "all": list(STAGES)}.get(stages, stages.split(","))
    wanted = set()

    def add(name):
        if name not in STAGES:
            raise SystemExit(f"--stages: unknown stage {name!r}; expected default, all or some of {', '.join(STAGES)}")
        wanted.add(name)
        for need in STAGES[name].needs:
            add(need)

    for name in names:
        add(name.strip())
    return [name for name in STAGES if name in wanted]


def command(name: str, cfg: Config) -> list[str]:
    """The stage's argv after `python`, its paths filled in."""
    stage = STAGES[name]
    return [a.format(out=cfg.out_root, data=cfg.data_dir) for a in stage.argv + (stage.quick if cfg.quick else ())]


def file_digests(paths) -> dict[str, str]:
    """sha256 of every file at or under each path, keyed by its path; a missing path is left out."""
    digests = {}
    for path in map(Path, paths):
        for f in sorted([path] if path.is_file() else path.rglob("*") if path.is_dir() else []):
            if f.is_file():
                digests[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return digests


def output_digests(name: str, cfg: Config) -> dict[str, str]:
    """sha256 of every file the stage wrote, keyed by its path written with {out} and {data}: a tree moved or
    copied elsewhere with the same files stays current."""
    digests = {}
    for template in (f"{{out}}/{name}", *STAGES[name].also_writes):
        real = template.format(out=cfg.out_root, data=cfg.data_dir)
        digests.update({template + path[len(real):]: d for path, d in file_digests([real]).items()})
    return digests


def module_files(name: str) -> list[Path]:
    """The files that importing `name` (a dotted name under nanoalign) may run: each subpackage's __init__.py on
    the way, then the module as a .py file or a package's __init__.py. Paths that do not exist (`name` is a
    function, say) are left out by the caller."""
    parts = name.split(".")
    files = [ROOT.joinpath(*parts[:i], "__init__.py") for i in range(2, len(parts))]
    return files + [ROOT.joinpath(*parts[:-1], parts[-1] + ".py"), ROOT.joinpath(*parts, "__init__.py")]


def imported_code(entry: Path) -> set[Path]:
    """entry and every package module it imports, directly or through others (read from the source with ast)."""
    seen, todo = set(), [entry]
    while todo:
        path = todo.pop()
        if path in seen or not path.exists():
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nanoalign"):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            todo += [f for n in names if n.startswith("nanoalign.") for f in module_files(n)]
    return seen


def code_digests(name: str) -> dict[str, str]:
    """The code a stage runs: its script or module, the package modules it imports, and its `also_runs` (an edit
    to the report's own code reruns nothing)."""
    argv = STAGES[name].argv
    entry = ROOT / (f"{argv[1].replace('.', '/')}.py" if argv[0] == "-m" else argv[0])
    files = imported_code(entry)
    for extra in STAGES[name].also_runs:
        files |= imported_code(ROOT / extra) if extra.endswith(".py") else {ROOT / extra}
    return {str(Path(p).relative_to(ROOT)): d for p, d in file_digests(sorted(files)).items()}


def why_rerun(name: str, key: dict, record: dict | None, cfg: Config) -> str | None:
    """Why the stage must run (a reason a reader can act on), or None when its run is current."""
    where = Path(cfg.out_root) / name
    if cfg.force == "all" or name in cfg.force.split(","):
        return "asked for (--force)"
    if not where.exists():
        return f"no run in {where}"
    if record is None or record.get("running"):
        if record is not None:
            return f"{where} holds a partial run (the report's last run of it was interrupted)"
        if not (where / STAGES[name].result).exists() or (where / ".next").exists():
            return f"{where} holds a partial run (no {STAGES[name].result}, or a checkpoint half-written)"
        return f"{where} holds a run the report did not make (its command, code and data are unknown)"
    now = output_digests(name, cfg)
    changed = sorted(p.format(out=cfg.out_root, data=cfg.data_dir) for p in now.keys() | record["outputs"].keys()
                     if now.get(p) != record["outputs"].get(p))
    if changed:
        return f"changed since the report wrote it: {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}"
    if record["argv"] != key["argv"]:
        return "its command changed"
    code = sorted(f for f in key["code"].keys() | record["code"].keys() if key["code"].get(f) != record["code"].get(f))
    if code:
        return f"the code changed: {', '.join(code[:3])}{' ...' if len(code) > 3 else ''}"
    rerun = [need for need in key["inputs"] if key["inputs"][need] != record["inputs"].get(need)]
    if rerun:
        return f"its input changed: {', '.join(f'{cfg.out_root}/{n}' for n in rerun)}"
    return None


def minutes(seconds: float) -> str:
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def outputs_digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record["outputs"], sort_keys=True).encode()).hexdigest()


def plan(names: list[str], manifest: dict, cfg: Config) -> dict:
    """{stage: (key, why it runs or None when reused)}: a stage also runs when a stage it reads runs first."""
    steps = {}
    for name in names:
        key = {"argv": list(STAGES[name].argv + (STAGES[name].quick if cfg.quick else ())), "code": code_digests(name),
               "inputs": {need: outputs_digest(manifest[need]) if steps[need][1] is None else "rerun"
                          for need in STAGES[name].needs}}
        first = [need for need in STAGES[name].needs if steps[need][1] is not None]
        steps[name] = (key, f"it reads {cfg.out_root}/{first[0]}, which runs first" if first
                       else why_rerun(name, key, manifest.get(name), cfg))
    return steps


SHARED = 0.6  # the speed of each of two stages side by side, against one alone (bench/RESULTS.md, "Two stages")


def speed(active: int) -> float:
    """How fast each of `active` stages progresses (in seconds of a run alone per second) on the 2-core machine."""
    return 1.0 if active <= 1 else 2 * SHARED / active


def critical_first(ready: list, work: dict, needs: dict) -> list:
    """The ready stages, the one that holds up the most work first: by the longest chain of seconds alone that
    starts with it (the stage, then a stage that reads it, and so on, over the stages in `work`); ties keep the
    order given (the pipeline's, in both callers). Critical-path list scheduling: PPO, which ends the chain
    SFT -> RM -> PPO, goes before best-of-N when one slot is free."""
    def chain(name):
        return work.get(name, 0.0) + max((chain(m) for m in work if name in needs[m]), default=0.0)
    return sorted(ready, key=lambda name: -chain(name))


def schedule(work: dict, needs: dict, jobs: int, running: dict | None = None) -> float:
    """Seconds until every stage in `work` (its seconds alone) is done, when up to `jobs` run side by side, each at
    `speed`, and a stage starts once the stages it needs (in `work` or `running`) are done, `critical_first`.
    running: {stage: its seconds alone still to go}."""
    clock, active, todo = 0.0, dict(running or {}), list(work)
    while todo or active:
        ready = critical_first([n for n in todo if all(m not in todo and m not in active for m in needs[n])],
                               work, needs)
        for name in ready[:max(0, jobs - len(active))]:
            active[name] = work[name]
            todo.remove(name)
        rate = speed(len(active))
        step = min(active.values()) / rate
        clock += step
        active = {n: left - step * rate for n, left in active.items() if left - step * rate > 1e-9}
    return clock


def clear_stage(name: str, record: dict | None, cfg: Config) -> None:
    """Before a stage runs again, its previous run leaves out/<stage>: deleted when the report made it and none of
    its files changed since (the report wrote every one of them), else moved aside whole (`checkpoint.move_aside`):
    a run made by hand, a partial one or one with an edited file is kept. Either way the report never reads a
    stale result, and a folder never mixes two runs."""
    where = Path(cfg.out_root) / name
    if record is not None and "outputs" in record and output_digests(name, cfg) == record["outputs"]:
        for entry in map(where.joinpath, run_entries(where)):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    elif aside := move_aside(where):
        print(f"[report] {name}: the previous run in {where} moved aside to {aside}")


def stage_dirs(name: str, cfg: Config) -> list[Path]:
    """The run folders a stage writes (its own, and those under out_root it rebuilds: the feedback model): each
    one's lock is checked before the report touches anything in it."""
    return [Path(cfg.out_root) / name, *(Path(p.format(out=cfg.out_root)) for p in STAGES[name].rebuilds
                                         if p.startswith("{out}/"))]


def run_pipeline(cfg: Config) -> dict:
    """Run (or reuse) every selected stage, up to `cfg.jobs` side by side as soon as the stages they read are
    done -> the manifest {stage: record} of the current runs. Each run's output goes to out/report/logs/."""
    report = Path(cfg.out_root) / "report"
    manifest_path, logs = report / "stages.json", report / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    names = selected(cfg.stages)
    steps = plan(names, manifest, cfg)
    eta = {name: manifest.get(name, {}).get("work", STAGES[name].seconds) if not cfg.quick
           else STAGES[name].seconds / 30  # --quick: seconds, in the proportions of the default runs
           for name, (_, reason) in steps.items() if reason is not None}
    needs = {name: STAGES[name].needs for name in names}
    for name, (_, reason) in steps.items():
        print(f"[report] {name}: {'reused (current)' if reason is None else f'runs: {reason}'}")
    print(f"[report] {len(eta)} of {len(names)} stages to run, about {minutes(schedule(eta, needs, cfg.jobs))}"
          + (f", up to {cfg.jobs} side by side" if cfg.jobs > 1 and len(eta) > 1 else ""), flush=True)

    def save():  # in pipeline order, whatever order the stages finish in
        write_json(manifest_path, {n: manifest[n] for n in STAGES if n in manifest})

    # Side by side, OpenMP threads that spin while they wait take the cores the other stage needs: two SFT runs
    # took 55 s together with spinning threads and 19 s with passive ones (13 s alone). Passive threads change
    # no result; each stage keeps torch's thread count, so its numbers are those of a run alone.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")} if cfg.jobs > 1 else None
    done = {name: manifest[name] for name, (_, reason) in steps.items() if reason is None}
    todo = [name for name in names if name not in done]
    busy = [str(d) for name in todo for d in stage_dirs(name, cfg) if in_use(d)]
    if busy:  # a live run's files are left alone: refused before any stage starts
        raise SystemExit(f"[report] in use by another run: {', '.join(busy)}; wait for it to finish, then run the "
                         f"report again")
    running, work, failed, t_start = {}, {}, [], time.time()
    t_poll = t_start
    while todo or running:
        ready = [] if failed else critical_first([n for n in todo if all(m in done for m in needs[n])], eta, needs)
        for name in ready[:cfg.jobs - len(running)]:
            todo.remove(name)
            key = steps[name][0]
            key["inputs"] = {need: outputs_digest(done[need]) for need in STAGES[name].needs}
            try:
                with contextlib.ExitStack() as held:  # each folder's lock first: a live run there is refused
                    for d in stage_dirs(name, cfg):
                        held.enter_context(locked(d))
                    clear_stage(name, manifest.get(name), cfg)
                    for old in STAGES[name].rebuilds:
                        shutil.rmtree(old.format(out=cfg.out_root, data=cfg.data_dir), ignore_errors=True)
            except SystemExit as e:
                failed.append(f"[report] stage {name} not run: {e}")
                continue
            manifest[name] = {"running": True}  # a kill from here on leaves a run the next call calls partial
            save()
            argv = command(name, cfg)
            script = [] if argv[0] == "-m" else [str(ROOT / argv[0])]  # found wherever the call runs
            with open(logs / f"{name}.log", "w") as log:
                child = subprocess.Popen([sys.executable, *script, *argv[len(script):]], stdout=log,
                                         stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent())
            running[name], work[name] = (child, time.time(), key), 0.0
            left = {n: max(0.0, eta[n] - work[n]) for n in running}
            print(f"[report {len(work)}/{len(eta)}] {name}: about {minutes(eta[name])} "
                  f"(about {minutes(schedule({n: eta[n] for n in todo}, needs, cfg.jobs, left))} left in all)\n"
                  f"  python {' '.join(argv)} > {logs / f'{name}.log'}", flush=True)
        if not running:
            break
        time.sleep(0.2)
        for n in running:  # its progress in seconds of a run alone: the next call's ETA
            work[n] += (time.time() - t_poll) * speed(len(running))
        t_poll = time.time()
        finished = [n for n, (child, _, _) in running.items() if child.poll() is not None]
        for name in finished:
            child, t0, key = running.pop(name)
            if child.returncode != 0 or not (Path(cfg.out_root) / name / STAGES[name].result).exists():
                tail = (logs / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
                print("\n".join(f"  | {line}" for line in tail), flush=True)
                failed.append(f"[report] stage {name} failed (exit code {child.returncode}): python "
                              f"{' '.join(command(name, cfg))} (its output: {logs / f'{name}.log'})")
                continue
            manifest[name] = done[name] = {**key, "outputs": output_digests(name, cfg), "seconds": time.time() - t0,
                                           "started": t0 - t_start, "work": work[name]}
            save()
            print(f"[report] {name}: done in {minutes(done[name]['seconds'])} "
                  f"({minutes(time.time() - t_start)} since the first stage started)", flush=True)
    if failed:
        raise SystemExit("\n".join(failed))
    return {name: done[name] for name in names}
