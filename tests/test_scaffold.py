"""Config parsing, the learning-rate schedule and the CPU heap setting."""

import math
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from nanoalign.config import parse_config
from nanoalign.scaffold import lr_at


@dataclass
class Cfg:
    lr: float = 1e-3  # learning rate
    steps: int = 10  # steps
    name: str = "run"  # name
    compile: bool = False  # compile
    max_len: int | None = None  # optional


def test_parse_types_and_defaults():
    cfg = parse_config(Cfg, ["--lr=0.5", "--steps=3", "--compile=True", "--max_len=None", "--name=x=y"])
    assert cfg == Cfg(lr=0.5, steps=3, name="x=y", compile=True, max_len=None)
    assert parse_config(Cfg, ["--max_len=7"]).max_len == 7
    assert parse_config(Cfg, []) == Cfg()


@pytest.mark.parametrize("argv,match", [
    (["--lrr=1"], "unknown config key 'lrr'; valid keys: compile, lr, max_len, name, steps"),
    (["--steps=1.5"], "cannot convert to int"),
    (["--compile=yes"], "expected True or False"),
    (["steps=3"], "expected --key=value"),
    (["--steps"], "expected --key=value"),
])
def test_parse_errors(argv, match):
    with pytest.raises(SystemExit, match=match):
        parse_config(Cfg, argv)


def test_help_prints_each_flag_with_its_default_type_and_comment(capsys):
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as exit_:
            parse_config(Cfg, ["--lr=2", flag])
        assert exit_.value.code == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[1:] == ["  --lr=0.001  (float)  learning rate", "  --steps=10  (int)  steps",
                             "  --name=run  (str)  name", "  --compile=False  (bool)  compile",
                             "  --max_len=None  (int | None)  optional"]


@pytest.mark.parametrize("module", ["train_sft", "train_rm", "train_dpo", "train_ppo", "nanoalign.evaluate",
                                    "nanoalign.rlaif", "experiments.rlaif_labels"])
def test_every_entry_point_has_help(module, capsys):
    import dataclasses
    import importlib
    cls = importlib.import_module(module).Config
    with pytest.raises(SystemExit) as exit_:
        parse_config(cls, ["--help"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    fields = dataclasses.fields(cls)
    assert len(lines) == len(fields)
    for f, line in zip(fields, lines):
        prefix = f"  --{f.name}={f.default}  ("
        _, sep, comment = line.removeprefix(prefix).partition(")  ")
        assert line.startswith(prefix) and sep and comment.strip(), f"--{f.name} has no comment in the Config"


def test_lr_schedule_warmup_then_cosine():
    kw = dict(max_steps=110, lr=1.0, warmup_steps=10, min_lr=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)  # Python floats: ~1e-16
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert lr_at(110, **kw) == pytest.approx(0.1)


_FAULTS = """
import resource, sys, torch
from nanoalign.scaffold import keep_cpu_heap
if sys.argv[1] == "keep":
    keep_cpu_heap()
def step(i):  # a training step's pattern: large activations of varying sizes alive at once, all freed at the end
    return [torch.empty((4 + (i + j) % 3) << 20).fill_(1.0) for j in range(6)]  # 16-24 MB each
step(0), step(1), step(2)  # warm-up: the heap grows to the step's size
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(10):
    step(i)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and rusage page faults")
@pytest.mark.slow  # counts page faults over many steps
def test_keep_cpu_heap_reuses_freed_memory_without_page_faults():
    """Memory freed at the end of a step comes back from the heap in the next, not as fresh zero-filled pages
    (4096 page faults per 16 MB): glibc's default trims the heap top, or maps each large block anew."""
    faults = {mode: int(subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "keep")}
    assert faults["default"] > 10 * 1024  # 4 MB or more faulted in again per step (37k-310k seen over 10 steps)
    assert faults["keep"] < 1000


def test_accumulate_syncs_gradients_on_the_last_micro_batch_only():
    from nanoalign.scaffold import accumulate

    class Recorder:  # stands in for an FSDP module
        def __init__(self):
            self.calls = []

        def set_requires_gradient_sync(self, sync):
            self.calls.append(sync)

    for items, size, parts in (([1, 2, 3, 4, 5], 2, [[1, 2], [3, 4], [5]]), ([1, 2], 4, [[1, 2]])):
        model = Recorder()
        got = []
        for micro in accumulate(model, items, size):
            got.append((micro, model.calls[-1]))  # the flag is set before the micro-batch's forward
        assert got == [(p, k == len(parts) - 1) for k, p in enumerate(parts)]
    assert list(accumulate(torch.nn.Linear(1, 1), [1, 2, 3], 2)) == [[1, 2], [3]]  # unsharded: no flag
