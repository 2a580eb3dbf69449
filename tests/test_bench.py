"""The benchmarks still run (smallest settings, no timing asserted: figures belong in bench/RESULTS.md)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO
from nanoalign.precision import SLOW, half_slowdown

pytestmark = pytest.mark.slow  # the benchmarks, each a subprocess: the full suite only


def run_bench(script, tmp_path, *args) -> dict:
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(REPO / "bench" / script), f"--out={out}", *args], check=True,
                   capture_output=True, text=True, cwd=REPO)
    return json.loads(out.read_text())


def test_dpo_throughput_runs(tmp_path):
    result = run_bench("dpo_throughput.py", tmp_path, "--compile=False", "--warmup=1", "--steps=1", "--pairs=2")
    for mode in ("live", "cached"):
        assert result[mode]["mode"] == mode and 0 < result[mode]["ratio"] and result[mode]["peak_rss_mb"] > 0


def test_dpo_throughput_runs_with_the_memory_flags(tmp_path):
    result = run_bench("dpo_throughput.py", tmp_path, "--compile=False", "--warmup=1", "--steps=1", "--pairs=2",
                       "--fused_head=True", "--activation_checkpointing=True", "--vocab=512")
    for mode in ("live", "cached"):
        assert result[mode]["fused_head"] and result[mode]["activation_checkpointing"] and result[mode]["vocab"] == 512


def test_dpo_throughput_runs_in_bf16_where_the_cpu_has_it(tmp_path):
    """Where this CPU only emulates bf16 (AVX2 and older: tens of times slower than fp32) the benchmark refuses
    --dtype=bf16 at once, naming the measured slowdown; where bf16 is native it runs."""
    if half_slowdown() > SLOW:
        with pytest.raises(subprocess.CalledProcessError) as e:
            run_bench("dpo_throughput.py", tmp_path, "--dtype=bf16")
        assert "--dtype=bf16: this CPU (torch capability" in e.value.stderr and not (tmp_path / "out.json").exists()
        pytest.skip(f"bf16 is emulated on this CPU ({half_slowdown():.0f}x slower than fp32): the fixed workload "
                    f"would take minutes")
    result = run_bench("dpo_throughput.py", tmp_path, "--compile=False", "--warmup=1", "--steps=1", "--pairs=2",
                       "--dtype=bf16")
    for mode in ("live", "cached"):
        assert result[mode]["dtype"] == "bf16" and 0 < result[mode]["ratio"]


def test_gpu_mfu_fused_head_section_runs_small_on_the_cpu(tmp_path):
    """The GPU benchmark's whole-graph step with the fused head, kept runnable without a GPU (`--small=True`)."""
    result = run_bench("gpu_mfu.py", tmp_path, "--small=True", "--sections=train_fused")
    assert result["train_fused"]["tokens_per_s"] > 0 and "train" not in result


def test_generate_runs(tmp_path):
    result = run_bench("generate.py", tmp_path, "--repeats=1", "--batch=2", "--new_tokens=4")
    assert result["vs_no_cache"] > 0 and result["hf_generate_tokens_per_s"] > 0


def test_flop_count_matches_torch_flop_counter():
    """bench/common.py's formula against torch's FLOP counter on a real forward (math attention, so QKᵀ and AV
    are matmuls it can count): every token through the LM head, and only the scored positions."""
    import sys
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from nanoalign.model import GPT, GPTConfig
    sys.path.insert(0, str(REPO / "bench"))
    from common import forward_flops
    c = GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=2, n_embd=32)
    model, ids = GPT(c).eval(), torch.randint(0, 300, (3, 40))
    scored = torch.zeros_like(ids, dtype=torch.bool)
    scored[:, 24:39] = True  # the positions whose logits score a response token
    for logits_at, n_scored in ((None, None), (scored, 45)):
        with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            model(ids, logits_at=logits_at)
        assert counter.get_total_flops() == forward_flops(c, 40, 120, n_scored)


def test_rollout_flop_count_matches_torch_flop_counter():
    """The compute floor's FLOPs (bench/common.py) against torch's FLOP counter on a real sampled rollout: the
    prefill's LM head at the last prompt token only, and no forward after the last token."""
    import sys
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from nanoalign.model import GPT, GPTConfig
    from nanoalign.sampling import sample
    sys.path.insert(0, str(REPO / "bench"))
    from common import rollout_flops
    c = GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=2, n_embd=32)
    model, prompts = GPT(c).eval(), torch.randint(2, 300, (3, 10)).tolist()
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        out = sample(model, prompts, 7, eos_id=-1, pad_id=0, generator=torch.Generator().manual_seed(0))
    assert out["response_ids"].shape == (3, 7)
    assert counter.get_total_flops() == rollout_flops(c, 3, 10, 7)


def test_ppo_throughput_runs(tmp_path):
    result = run_bench("ppo_throughput.py", tmp_path, "--episodes=4", "--prompt=8", "--new_tokens=8", "--updates=1")
    assert result["episodes_per_s"] > 0 and set(result["ratio_to_matmul"]) == {"rollout", "score", "train"}
    assert result["peak_rss_mb"] > 0


def test_ppo_update_flop_count_matches_torch_flop_counter():
    """bench/ppo_throughput.py's FLOPs of one whole update (rollout, scoring, 4 epochs of training) against
    torch's FLOP counter on a real one: equal but for the scalar heads' d x 1 matmuls, which the formula leaves
    out (under 1% here)."""
    import sys
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    sys.path.insert(0, str(REPO / "bench"))
    import ppo_throughput
    cfg = ppo_throughput.Config(episodes=4, prompt=6, new_tokens=5, updates=1, vocab_size=300, n_layer=2, n_head=2,
                                n_embd=32)
    c, one_update = ppo_throughput.workload(cfg)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        one_update(0)
    expected = sum(ppo_throughput.update_flops(c, cfg).values())
    assert expected <= counter.get_total_flops() <= expected * 1.01
