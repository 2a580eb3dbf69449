"""A run's numeric precision, --dtype: fp32, bf16 or fp16, and the dynamic loss scaler that fp16 needs.

    fp32  parameters, gradients, AdamW moments and every forward in fp32 (the default).
    bf16  pure bf16: the trained model is cast, so its parameters, gradients and AdamW moments are bf16 (no fp32
          master copy), and so are the frozen models (reference, reward model). bf16 has fp32's exponent range,
          so no loss scaling; its 8-bit significand (2-3 significant digits) rounds away an update smaller than
          2^-9 to 2^-8 of its weight (Kalamkar et al. 2019 keep fp32 master weights for this reason). On the
          default 4-layer model an AdamW step (random gradients) changed 26-46% of the weights at lr 3e-5
          (PPO's), 76-100% at 2e-4 (DPO's), 97-100% at 2e-3 (SFT's): at PPO's rate compare with fp32 first.
    fp16  mixed precision (Micikevicius et al. 2018): fp32 master weights and AdamW moments, the trained model's
          forward under autocast to fp16, frozen models cast to fp16, and the loss scaled (`LossScaler`), since
          fp16's range (6e-8 .. 65504) loses small gradients and an AdamW ε of 1e-8. CUDA only.
Log-probs, KL, entropy and rewards are computed in fp32 from half-precision logits (`logprobs.token_logps`,
`logprobs.widen`). Checkpoints are written in fp32 (`checkpoint._write_files`): widening bf16 is exact, so fp32
code reads them unchanged and a resumed bf16 run continues bit for bit. Under torchrun bf16 shards the bf16
parameters with FSDP2, gradients summed over ranks in fp32 (`scaffold.wrap_model`); fp16 is refused there (its
overflow test would have to agree over ranks).
bf16 on a CPU runs only where the CPU multiplies bf16 natively (AVX512-BF16, AMX, Arm's BF16 extension): elsewhere
torch emulates it, tens to hundreds of times slower than fp32, and `run_dtype` refuses it unless told
(`--allow_slow_dtype=True`), naming the slowdown it measured (`half_slowdown`).
"""

import functools
import math
import time
import types

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


SLOW = 3.0  # bf16 matmuls this many times slower than fp32 on a CPU: emulated, refused without --allow_slow_dtype


def run_dtype(name: str, device: torch.device, world: int = 1, allow_slow: bool = False) -> torch.dtype:
    """--dtype=name on `device` with `world` processes -> the dtype of the run's forwards, fp32 being torch's
    default dtype (float32 unless a test set float64: models are then cast to nothing else); a combination that
    is not supported, or bf16 on a CPU that only emulates it (unless `allow_slow`), is refused with a one-line
    error naming the flag (before anything is written)."""
    if name not in DTYPES:
        raise SystemExit(f"--dtype={name}: expected one of {', '.join(DTYPES)}")
    if name == "fp16" and device.type != "cuda":
        raise SystemExit(f"--dtype=fp16 needs a CUDA device (this run is on {device.type}): use --dtype=bf16, "
                         "which the CPU runs natively, or fp32")
    if name == "fp16" and world > 1:
        raise SystemExit(f"--dtype=fp16 is single-process only ({world} processes): use --dtype=bf16 under torchrun")
    if name == "bf16" and device.type == "cpu" and not allow_slow and (slowdown := half_slowdown()) > SLOW:
        raise SystemExit(f"--dtype=bf16: this CPU (torch capability {torch.backends.cpu.get_cpu_capability()}) has "
                         f"no native bf16 matmul: a 256x256 bf16 matmul ran {slowdown:.0f}x slower than fp32 here, "
                         f"just now; use --dtype=fp32, or --allow_slow_dtype=True to run bf16 anyway")
    return torch.get_default_dtype() if name == "fp32" else DTYPES[name]


@functools.cache
def half_slowdown(n: int = 256) -> float:
    """How many times longer an n×n bf16 matmul takes than an fp32 one on this CPU, timed once per process on one
    thread (the best of a few calls after a warm-up; on a loaded machine a multi-threaded call waits for its
    slowest thread): about 1 or less with native bf16, tens to hundreds where torch emulates it. About 0.2 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def best(dtype, repeats):
            a, b = (torch.randn(n, n).to(dtype) for _ in range(2))
            a @ b
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t0)
            return min(times)
        return best(torch.bfloat16, 2) / best(torch.float32, 5)
    finally:
        torch.set_num_threads(threads)


def prepare(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The model a run trains, on its device, at the run's dtype: cast to bf16 (parameters, and so gradients
    and AdamW moments), or for fp16 kept in fp32 with its forward under autocast to fp16; fp32 untouched."""
    if dtype == torch.bfloat16:
        model.to(dtype)
    elif dtype == torch.float16:
        model.forward = types.MethodType(_fp16_forward, model)  # a bound method: a deepcopy rebinds it to the copy
    return model


def _fp16_forward(self, *args, **kwargs):
    with torch.autocast(next(self.parameters()).device.type, dtype=torch.float16):
        return type(self).forward(self, *args, **kwargs)


def loss_scaler(dtype: torch.dtype):
    """A LossScaler for fp16, None otherwise."""
    return LossScaler() if dtype == torch.float16 else None


class LossScaler:
    """Dynamic loss scaling (Micikevicius et al. 2018 §3.2, with torch.amp.GradScaler's schedule): the loss is
    multiplied by S before backward, so that small gradients survive fp16, and the gradients divided by S before
    the step. A step whose gradients are non-finite is skipped (`scaffold.optimizer_step`) and S halved; after
    `growth_interval` steps in a row without one, S doubles. The change takes effect when the next loss is
    scaled, after the step: every optimizer that steps on one backward (PPO's policy and critic) divides by the
    S that multiplied it, and the micro-batches of one step share one S. At S = 1 a non-finite gradient is no
    overflow of the scaling: the run stops there as an fp32 run does."""

    def __init__(self, scale: float = 2.0 ** 16, growth_interval: int = 2000):
        self.scale, self.growth_interval = scale, growth_interval
        self.good = 0  # steps in a row without an overflow
        self.outcome = None  # since the last scaled loss: None (no step yet), True (an overflow), False (none)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        if self.outcome is True:
            self.scale, self.good = max(1.0, self.scale / 2), 0
        elif self.outcome is False:
            self.good += 1
            if self.good == self.growth_interval:
                self.scale, self.good = self.scale * 2, 0
        self.outcome = None
        return loss * self.scale

    def unscale_(self, params) -> None:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(1 / self.scale)  # S a power of 2: exact

    def overflowed(self, losses: dict) -> bool:
        """The gradients were non-finite: True if the step is to be skipped as an overflow (finite losses, S > 1;
        S is halved before the next backward), False if the run is to stop."""
        skip = self.scale > 1 and all(math.isfinite(v) for v in losses.values())
        self.outcome = self.outcome or skip
        return skip

    def stepped(self) -> None:
        self.outcome = bool(self.outcome)
