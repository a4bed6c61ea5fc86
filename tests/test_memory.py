"""The PyTorch path's extra memory is bounded by its tile budget, not by N × V."""

import pytest
import torch

from bench.memory import cpu_peak_supported, peak_extra_bytes
from halo_ops import chunked, linear_logprobs


@pytest.mark.slow
@pytest.mark.skipif(not cpu_peak_supported(), reason="needs Linux /proc/self/clear_refs to read peak RSS")
def test_torch_path_peak_memory_within_tile_budget():
    """N=16384, V=32000, fp32: full logits alone are 2.1 GB (8 GB with log-softmax and grads)."""
    n_tokens, dim, vocab = 16384, 128, 32000
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n_tokens, dim, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) * 0.05).requires_grad_()
    targets = torch.randint(0, vocab, (n_tokens,), generator=gen)

    def step():
        out = linear_logprobs(hidden, weight, targets, impl="torch", reduction="sum")
        out.backward()

    step()  # once first: the one-time allocations of a first backward (autograd's, the BLAS library's) are not its own
    peak, _ = peak_extra_bytes(step)
    logits_bytes = n_tokens * vocab * 4
    gradient_bytes = (hidden.numel() + weight.numel()) * 4  # the outputs themselves, unavoidable
    tile_bytes = chunked.TILE_ELEMENTS * 4
    budget = gradient_bytes + 12 * tile_bytes + 64 * n_tokens
    assert peak <= budget, f"peak {peak / 2**20:.0f} MiB > budget {budget / 2**20:.0f} MiB"
    assert peak <= logits_bytes / 16
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


@pytest.mark.slow
@pytest.mark.skipif(not cpu_peak_supported(), reason="needs Linux /proc/self/clear_refs to read peak RSS")
def test_eager_fused_kto_peak_memory_within_its_bound(monkeypatch):
    """The eager schedule on the PyTorch path at N=16384 (32 × 512), D=128, V=32000, fp32: beyond the inputs, the
    gradient outputs plus at most ``eager_memory_bound`` (the kept gradients and a chunk's logits) and a few tiles.
    Its logits for every token would be 2.1 GB; the bound is 293 MB."""
    from halo_ops import eager, fused_kto, fused_linear_kto_loss

    batch, seq, dim, vocab = 32, 512, 128, 32000
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, seq, dim, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) * 0.05).requires_grad_()
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels, ref = torch.arange(batch) % 2 == 0, torch.full((batch,), -5000.0)
    runs = []
    real = fused_kto.eager_forward
    monkeypatch.setattr(fused_kto, "eager_forward", lambda *a, **k: runs.append(1) or real(*a, **k))

    def step():
        fused_linear_kto_loss(hidden, weight, targets, labels, ref, kl=0.1, impl="torch").loss.backward()

    step()  # once first, as above
    peak, _ = peak_extra_bytes(step)
    assert runs, "the eager schedule ran"
    gradient_bytes = (hidden.numel() + weight.numel()) * 4
    budget = gradient_bytes + eager.eager_memory_bound(batch * seq, dim, vocab, torch.float32) + \
        4 * chunked.TILE_ELEMENTS * 4 + 64 * batch * seq
    assert peak <= budget, f"peak {peak / 2**20:.0f} MiB > budget {budget / 2**20:.0f} MiB"
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
