"""Hand-written optimiser pieces shared by the reference updates (test_*_reference.py): no torch.optim, no
nanoalign.scaffold, one parameter at a time in the parameters' own dtype."""
import math

import torch

BETAS = (0.9, 0.95)  # nanoalign.scaffold.make_optimizer's AdamW betas (a stated departure: β₂ = 0.95)


def warmup_cosine(step: int, max_steps: int, lr: float, warmup: int, min_lr: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from lr down to min_lr at max_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def clip_and_adamw(params, lr: float, state: dict, grad_clip: float, eps: float, weight_decay: float = 0.0) -> float:
    """Clip the global gradient norm to grad_clip, then one AdamW step: decoupled weight decay on matrices only,
    bias-corrected moments. state maps each parameter to (m, v, steps). Returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    norm = math.sqrt(sum((p.grad ** 2).sum().item() for p in params))
    scale = min(1.0, grad_clip / (norm + 1e-6)) if grad_clip > 0 else 1.0
    with torch.no_grad():
        for p in params:
            g = p.grad * scale
            m, v, k = state.get(p, (torch.zeros_like(p), torch.zeros_like(p), 0))
            m, v, k = BETAS[0] * m + (1 - BETAS[0]) * g, BETAS[1] * v + (1 - BETAS[1]) * g * g, k + 1
            state[p] = (m, v, k)
            if p.dim() >= 2:
                p -= lr * weight_decay * p
            p -= lr * (m / (1 - BETAS[0] ** k)) / ((v / (1 - BETAS[1] ** k)).sqrt() + eps)
            p.grad = None
    return norm


def log_sigmoid(x):
    """log σ(x) for a scalar tensor, stable on both sides."""
    return -torch.log1p(torch.exp(-x)) if x >= 0 else x - torch.log1p(torch.exp(x))
