"""How this suite's tolerances are derived.

Two right computations of one quantity differ only by rounding, and rounding has a size that follows from the
dtype, the number of operations and the magnitude of the values: one op rounds to within u = eps/2 relative
(float64 2⁻⁵³ ≈ 1.1e-16, fp32 2⁻²⁴ ≈ 6e-8, bf16 2⁻⁸ ≈ 4e-3), a sum of n terms to within about n·u·Σ|terms|
(√n·u typically; the order of the sum is the kernel's choice: ATen's vectorised and scalar kernels and the BLAS
sum in different orders). So every comparison says what bounds the difference and sets the tolerance relative to
the magnitude involved, with a wide margin over that bound yet far below the size of a real bug (an off-by-one in
a mask, a wrong coefficient: 1e-2 relative or more). Equation checks run in float64 so that 1e-9 means something.
Training loops run in float64 as well when compared with a hand-written reference: AdamW divides by √v + ε, so an
fp32 gradient that should be exactly 0 (a direction the loss is invariant to, such as a reward model's output
bias under a loss of reward differences) is rounding noise that Adam turns into a step of up to lr. Exact claims
(same kernels, same order: a resumed run, a cached value) stay exact or at a few ulps of the values compared.
"""
import torch

FP64_EPS = torch.finfo(torch.float64).eps  # 2⁻⁵² ≈ 2.2e-16
FP32_EPS = torch.finfo(torch.float32).eps  # 2⁻²³ ≈ 1.2e-7
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2⁻⁷ ≈ 7.8e-3
FP16_EPS = torch.finfo(torch.float16).eps  # 2⁻¹⁰ ≈ 9.8e-4


def norm_close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    """‖a − b‖ ≤ rel·‖b‖ in float64: the norm-wise relative difference, which rounding bounds by a few u times the
    condition of the computation whatever the size of single entries (an entry near 0 carries its neighbours'
    absolute error and is no relative scale of its own). Two zero tensors are close."""
    a, b = a.detach().double(), b.detach().double()
    return (a - b).norm().item() <= rel * b.norm().item()


def steps_close(got: dict, want: dict, start: dict, rel: float = 1e-3) -> bool:
    """Two fp32 training runs that differ only in the order of their sums: the weights' change from `start` (a
    tensor missing there started at 0), all tensors as one vector, within rel of itself norm-wise.

    AdamW's step lr·m̂/(√v̂ + ε) is scale-free: a gradient off by δ relative moves the step by δ (fp32 gradients
    of these tiny models: ~1e-6), so the changes agree to ~1e-6 relative; but a coordinate whose gradient is at the
    rounding level (exactly 0 in exact arithmetic) takes a step of any size up to lr in either run, so single
    entries, or a whole bias the loss is invariant to, have no relative bound. Measured over the whole change they
    are a small share: rel = 1e-3 holds with a wide margin and still catches one tensor off by lr-sized steps."""
    def change(w):
        return torch.cat([(w[k].double() - start[k].double() if k in start else w[k].double()).flatten()
                          for k in sorted(want)])
    return got.keys() == want.keys() and norm_close(change(got), change(want), rel)
