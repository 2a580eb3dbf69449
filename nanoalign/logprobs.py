"""Per-token log-probabilities: the one function every stage scores tokens with (SFT, DPO, PPO, evaluation and the
AI feedback model), a fast path, and beside it the plain line it must agree with.

    log p(y_t | y_<t) = log softmax(z_t / τ)[y_t]           z_t the logits at position t, τ the temperature

`reference_token_logps` is that line as written, an fp32 [.., V] log-softmax and a gather: the definition to read.
`token_logps` computes the same numbers without its costs (fused log-softmax + NLL, row chunks, a hand-written
backward for half-precision logits). tests/test_losses.py checks that the two agree, values and gradients, in
fp32, bf16 and across chunk boundaries.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def reference_token_logps(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[labels] in fp32 (float64 stays): logits [..., V], labels [...] -> [...].
    The readable definition of `token_logps`; it holds a full fp32 log-softmax the size of the logits."""
    logp = (widen(logits) / temperature).log_softmax(-1)
    return logp.gather(-1, labels[..., None])[..., 0]


def widen(x: Tensor) -> Tensor:
    """x in fp32, or float64 if it is float64: log-probs, KL and entropy never lose precision."""
    return x if x.dtype == torch.float64 else x.float()


def token_logps(logits: Tensor, labels: Tensor, temperature: float = 1.0, chunk_rows: int = 4096) -> Tensor:
    """Per-token log-probability of `labels` under softmax(logits / temperature), in fp32 (float64 stays).

    logits [B, T, V] (any float dtype), labels [B, T] -> [B, T]. Computed as z[y] - logsumexp(z) in fp32 over
    chunks of rows, so no fp32 [B, T, V] is ever held at once (fp16 log-probs give NaN losses: trl #878).
    Under autograd, fp32 logits go through ATen's fused log-softmax + NLL, which keeps an fp32 log-softmax the
    size of the logits; half-precision logits through `_HalfLogps`, which keeps only the logits themselves.
    Dividing by the sampling temperature everywhere keeps rollout, reference and training log-probs
    of the same distribution (N detail 10).
    """
    assert logits.shape[:-1] == labels.shape, f"logits {tuple(logits.shape)} vs labels {tuple(labels.shape)}"
    flat, y = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)  # [N, V], [N]
    # split (backward: one cat), not slices (backward: a zero [N, V] gradient per slice); one chunk: neither
    chunks = zip(flat.split(chunk_rows), y.split(chunk_rows)) if flat.shape[0] > chunk_rows else [(flat, y)]
    out = []
    for z, target in chunks:
        if z.requires_grad and torch.is_grad_enabled() and z.element_size() < 4:
            out.append(_HalfLogps.apply(z, target, temperature))
            continue
        z = widen(z)  # [n, V]
        z = z if temperature == 1.0 else z / temperature
        # ATen's fused log-softmax + NLL: half the time of gather - logsumexp, forward + backward (bench/)
        out.append(-F.cross_entropy(z, target, reduction="none"))
    return (out[0] if len(out) == 1 else torch.cat(out)).view(labels.shape)


class _HalfLogps(torch.autograd.Function):
    """log softmax(z / τ)[y] for bf16/fp16 logits z [n, V], labels y [n] -> [n] fp32, computed in fp32. Keeps z
    as it is (2 bytes an entry) and the row logsumexp [n] for the backward, which recomputes the softmax p:
    ∂ log p_y / ∂z_j = (1[j = y] − p_j) / τ. ATen's path would keep an fp32 log-softmax (4 bytes an entry)."""

    @staticmethod
    def forward(ctx, z, y, temperature):
        zf = z.float() / temperature  # [n, V], freed on return
        lse = torch.logsumexp(zf, -1)  # [n]
        ctx.save_for_backward(z, y, lse)
        ctx.temperature = temperature
        return zf.gather(1, y[:, None])[:, 0] - lse

    @staticmethod
    def backward(ctx, grad_out):
        z, y, lse = ctx.saved_tensors
        g = grad_out.float() / ctx.temperature  # [n]
        grad = (z.float() / ctx.temperature - lse[:, None]).exp_().mul_(-g[:, None])  # -p_j g / τ
        grad.scatter_add_(1, y[:, None], g[:, None])  # + 1[j = y] g / τ
        return grad.to(z.dtype), None, None
