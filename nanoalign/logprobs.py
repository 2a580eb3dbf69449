"""Per-token log-probabilities: the one function every stage scores tokens with (SFT, DPO, PPO, evaluation and the
AI feedback model), a fast path, and beside it the plain line it must agree with.

    log p(y_t | y_<t) = log softmax(z_t / τ)[y_t]           z_t the logits at position t, τ the temperature

`reference_token_logps` is that line as written, an fp32 [.., V] log-softmax and a gather: the definition to read.
`token_logps` computes the same numbers without its costs (fused log-softmax + NLL, row chunks, a hand-written
backward for half-precision logits). `linear_logps` starts one step earlier, from the final hidden states and the
LM head's weight, and never holds the [N, V] logits at all. tests/test_losses.py checks that they agree, values
and gradients, in float64, fp32, bf16 (and autocast) and across chunk boundaries.
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


def linear_logps(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0,
                 chunk_rows: int = 512) -> Tensor:
    """log softmax(h Wᵀ / τ)[y] for hidden states h [N, D], the LM head's weight W [V, D] and labels y [N] -> [N],
    in fp32 (float64 stays): the LM head and the log-probs in one, over chunks of rows (`_LinearLogps`).

    Autograd keeps h, W and one logsumexp per row; the backward recomputes each chunk's logits. So no [N, V]
    tensor outlives its chunk, forward or backward, for one more LM-head matmul per chunk: the trade of the
    fused linear + cross-entropy kernels (e.g. Liger Kernel, Hsu et al. 2024), here in plain PyTorch, which
    torch.compile may fuse further. Worth it where the logits dwarf the hidden states (V = 50,257 against
    D = 768 in GPT-2); on the CPU workloads the extra matmul costs more time than it saves (bench/RESULTS.md).
    """
    return _LinearLogps.apply(hidden, weight, labels, temperature, chunk_rows)


class _LinearLogps(torch.autograd.Function):
    """Chunked LM head + log-softmax. With z = h Wᵀ / τ and p = softmax(z), the gradient of log p_y is
    (1[j = y] − p_j) / τ on z_j; so for an upstream gradient g per row, G = g (onehot(y) − p) / τ [n, V] and
    ∂h = G W, ∂W = Gᵀ h, summed over chunks. The backward recomputes the logits under the forward's autocast
    state, so that it subtracts each row's logsumexp from the very logits it was taken of."""

    @staticmethod
    def forward(ctx, h, weight, y, temperature, chunk_rows):
        assert len(h) == len(y), f"{len(h)} hidden states for {len(y)} labels"
        out, lse = [], []
        for hc, yc in zip(h.split(chunk_rows), y.split(chunk_rows)):
            z = _logits(hc, weight, temperature)  # [n, V], freed at the end of the iteration
            lse.append(torch.logsumexp(z, -1))
            out.append(z.gather(1, yc[:, None])[:, 0] - lse[-1])
        ctx.save_for_backward(h, weight, y, torch.cat(lse))
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        ctx.autocast = torch.is_autocast_enabled(h.device.type), torch.get_autocast_dtype(h.device.type)
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, y, lse = ctx.saved_tensors
        g = widen(grad_out) / ctx.temperature  # [N]
        grad_h, grad_w = [], torch.zeros_like(weight, dtype=g.dtype)  # ∂W accumulates in fp32 (float64)
        enabled, dtype = ctx.autocast
        with torch.autocast(h.device.type, dtype=dtype, enabled=enabled):
            for hc, yc, gc, lc in zip(*(t.split(ctx.chunk_rows) for t in (h, y, g, lse))):
                gz = _logits(hc, weight, ctx.temperature).sub_(lc[:, None]).exp_().mul_(-gc[:, None])  # -p_j g / τ
                gz = gz.scatter_add_(1, yc[:, None], gc[:, None]).to(h.dtype)  # + 1[j = y] g / τ, [n, V]
                grad_h.append(gz @ weight)
                if gz.dtype == grad_w.dtype and not enabled:
                    grad_w.addmm_(gz.t(), hc)  # in place: no [V, D] temporary per chunk
                else:
                    grad_w += gz.t() @ hc  # half-precision products, summed in fp32
        return torch.cat(grad_h), grad_w.to(weight.dtype), None, None, None


def _logits(h: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """A chunk's logits z = h Wᵀ / τ [n, V] in fp32 (float64 stays), a fresh tensor the caller may overwrite."""
    z = widen(h @ weight.t())
    return z if temperature == 1.0 else z.div_(temperature)
