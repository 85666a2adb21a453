"""The AND loss against the paper: Eq 2, 3, 7 (values) and Eq 9-11 (gradients), plus Eq 5 (entropy)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.loss import and_loss, and_loss_per_sample, instance_loss, log_probs
from trainer.memory import ema_update_, init_memory

TAU = 0.1


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _softmax_np(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def test_instance_and_anchor_loss_values_match_eq_2_3_7():
    memory = _unit(12, 5, 0)
    features = _unit(4, 5, 1)
    indices = torch.tensor([3, 7, 0, 11])
    anchor = torch.zeros(12, dtype=torch.bool)
    anchor[[7, 11]] = True                      # samples 7 and 11 are anchors, 3 and 0 instances
    neighbours = torch.tensor([[(i + 1) % 12, (i + 5) % 12] for i in range(12)])  # k = 2

    p = _softmax_np(features.numpy() @ memory.numpy().T / TAU)
    expected = []
    for b, i in enumerate(indices.tolist()):
        if anchor[i]:
            hood = [i, *neighbours[i].tolist()]
            expected.append(-np.log(p[b, hood].sum()))       # Eq 3 with the anchor itself included
        else:
            expected.append(-np.log(p[b, i]))                 # Eq 2
    per = and_loss_per_sample(features, memory, indices, anchor, neighbours, TAU)
    np.testing.assert_allclose(per.numpy(), expected, rtol=1e-12)
    assert and_loss(features, memory, indices, anchor, neighbours, TAU).item() == pytest.approx(np.mean(expected), rel=1e-12)
    # No anchors: the instance loss of Eq 2.
    inst = [-np.log(p[b, i]) for b, i in enumerate(indices.tolist())]
    assert instance_loss(features, memory, indices, TAU).item() == pytest.approx(np.mean(inst), rel=1e-12)


def test_log_probs_are_a_normalised_log_softmax_over_all_rows():
    memory, features = _unit(9, 3, 2), _unit(2, 3, 3)
    lp = log_probs(features, memory, TAU)
    assert lp.shape == (2, 9)
    np.testing.assert_allclose(lp.exp().sum(1).numpy(), [1.0, 1.0], rtol=1e-12)


def test_self_and_negative_neighbours_are_not_counted_twice():
    memory, features = _unit(6, 4, 4), _unit(1, 4, 5)
    idx = torch.tensor([2])
    anchor = torch.ones(6, dtype=torch.bool)
    with_self = torch.tensor([[2, 4]] * 6)        # neighbour list containing the anchor itself
    padded = torch.tensor([[4, -1]] * 6)          # and one padded with -1
    only = torch.tensor([[4]] * 6)
    ref = and_loss(features, memory, idx, anchor, only, TAU)
    assert and_loss(features, memory, idx, anchor, with_self, TAU).item() == pytest.approx(ref.item(), rel=1e-12)
    assert and_loss(features, memory, idx, anchor, padded, TAU).item() == pytest.approx(ref.item(), rel=1e-12)


def test_tiny_temperatures_stay_finite():
    memory, features = _unit(50, 8, 6), _unit(5, 8, 7)
    idx = torch.arange(5) * 7
    anchor = torch.ones(50, dtype=torch.bool)
    nbrs = (torch.arange(50) * 3 % 50).view(-1, 1)
    for tau in (1e-2, 1e-3, 1e-4):
        loss = and_loss(features.float(), memory.float(), idx, anchor, nbrs, tau)
        assert torch.isfinite(loss)


# ---- gradients, in the paper's form: x_i is both the query and the i-th memory row (Eq 9-11)

def _paper_setup(n=7, d=4, seed=8):
    x = _unit(n, d, seed).clone().requires_grad_(True)
    return x


def test_instance_gradient_matches_eq_9_when_memory_rows_are_the_features():
    x = _paper_setup()
    i = 3
    loss = and_loss(x[i:i + 1], x, torch.tensor([i]), None, None, TAU)   # L = -log p_ii
    (grad,) = torch.autograd.grad(loss, x)
    with torch.no_grad():
        p = torch.softmax(x[i] @ x.t() / TAU, 0)
        want = (p.view(-1, 1) * x[i]).clone() / TAU                            # dL/dx_j = p_ij x_i / tau
        want[i] = (p @ x + (p[i] - 2) * x[i]) / TAU                             # Eq 9
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


def test_anchor_gradient_matches_corrected_eq_10_and_eq_11():
    """Eq 10 as printed has typos; the correct form (N = {i} U N_k(i), p~ normalised over N):
    dL/dx_i = (1/tau)[sum_k p_ik x_k - sum_{k in N} p~_ik x_k + (p_ii - p~_ii) x_i]
    dL/dx_j = (1/tau)(p_ij - p~_ij) x_i for j in N \\ {i}, (1/tau) p_ij x_i otherwise (Eq 11)."""
    x = _paper_setup()
    i, nbrs = 2, [5, 0]
    anchor = torch.zeros(7, dtype=torch.bool)
    anchor[i] = True
    neighbours = torch.zeros(7, 2, dtype=torch.long)
    neighbours[i] = torch.tensor(nbrs)
    loss = and_loss(x[i:i + 1], x, torch.tensor([i]), anchor, neighbours, TAU)
    (grad,) = torch.autograd.grad(loss, x)
    with torch.no_grad():
        p = torch.softmax(x[i] @ x.t() / TAU, 0)
        hood = [i, *nbrs]
        pt = torch.zeros_like(p)
        pt[hood] = p[hood] / p[hood].sum()
        want = ((p - pt).view(-1, 1) * x[i]) / TAU                             # Eq 11 (both cases)
        want[i] = (p @ x - pt @ x + (p[i] - pt[i]) * x[i]) / TAU               # Eq 10, corrected
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


def test_training_gradient_with_a_constant_memory_bank():
    """What training uses: the bank is a constant, the batch mean is taken.
    dL/dx_b = (1/B)(1/tau)[sum_k p_bk m_k - m_i] (instance), [... - sum_{k in N} p~_bk m_k] (anchor)."""
    memory = _unit(10, 4, 9)
    x = _unit(3, 4, 10).clone().requires_grad_(True)
    indices = torch.tensor([1, 6, 8])
    anchor = torch.zeros(10, dtype=torch.bool)
    anchor[6] = True
    neighbours = torch.tensor([[(j + 2) % 10] for j in range(10)])
    loss = and_loss(x, memory, indices, anchor, neighbours, TAU)
    (grad,) = torch.autograd.grad(loss, x)
    with torch.no_grad():
        p = torch.softmax(x @ memory.t() / TAU, 1)
        want = torch.empty_like(x)
        for b, i in enumerate(indices.tolist()):
            hood = [i, *neighbours[i].tolist()] if anchor[i] else [i]
            pt = torch.zeros(10, dtype=x.dtype)
            pt[hood] = p[b, hood] / p[b, hood].sum()
            want[b] = (p[b] @ memory - pt @ memory) / TAU / 3
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)
    # The trainer's bank is such a constant: made without autograd, and still a plain tensor (no
    # grad, no graph) after the EMA update with features that require grad.
    bank = init_memory(10, 4, torch.Generator().manual_seed(9))
    assert not bank.requires_grad
    ema_update_(bank, indices, x)
    assert not bank.requires_grad and bank.grad_fn is None


# ---- entropy (Eq 5) as nbr_index computes it, against a brute-force numpy reference

def test_entropy_and_neighbours_match_numpy_brute_force():
    nbr_index = pytest.importorskip("nbr_index")
    bank = F.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(11)), dim=1)
    result = nbr_index.knn_entropy(bank, k=3, tau=TAU, backend="torch", device="cpu")
    m = bank.double().numpy()
    z = m @ m.T / TAU                                                          # self included (Eq 5)
    p = _softmax_np(z)
    entropy = -(p * np.log(p)).sum(1)
    np.testing.assert_allclose(result.entropy, entropy, rtol=1e-4, atol=1e-4)
    sims = m @ m.T
    np.fill_diagonal(sims, -np.inf)                                            # self excluded (Eq 1)
    np.testing.assert_array_equal(result.neighbours, np.argsort(-sims, axis=1, kind="stable")[:, :3])
