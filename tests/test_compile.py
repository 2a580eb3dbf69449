"""torch.compile (per block, in place) against eager: same logits, gradients and state-dict keys."""

import copy

import torch

from nanoalign.losses import token_logps
from nanoalign.model import GPT, GPTConfig
from nanoalign.scaffold import Dist, wrap_model


def test_compiled_blocks_match_eager():
    torch.manual_seed(0)
    eager = GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=32))
    compiled = wrap_model(copy.deepcopy(eager), Dist(0, 1, torch.device("cpu")), compile=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefixes
    idx = torch.randint(0, 97, (3, 24))
    mask = torch.ones_like(idx)
    mask[0, :6] = 0  # a left-padded row exercises the masked attention path
    for model in (eager, compiled):
        logits = model(idx, attention_mask=mask)
        token_logps(logits[:, :-1], idx[:, 1:]).sum().backward()
    assert torch.allclose(compiled(idx, attention_mask=mask), eager(idx, attention_mask=mask), atol=1e-4)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-4), name
