"""The memory bank: initialisation and the EMA update of Eq 8, duplicates rule included."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.memory import ema_update_, init_memory, last_occurrence_of_each


def test_init_is_unit_rows_and_seeded():
    a = init_memory(100, 16, torch.Generator().manual_seed(3))
    b = init_memory(100, 16, torch.Generator().manual_seed(3))
    c = init_memory(100, 16, torch.Generator().manual_seed(4))
    assert a.shape == (100, 16) and a.dtype == torch.float32 and not a.requires_grad
    torch.testing.assert_close(a.norm(dim=1), torch.ones(100))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ema_update_is_eq_8_then_normalise_on_the_batch_rows_only():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    before = memory.clone()
    feats = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    ema_update_(memory, torch.tensor([0, 2]), feats, eta=0.5)
    # row 0: 0.5 [1, 0] + 0.5 [0, 1] = [0.5, 0.5] -> [1, 1] / sqrt 2
    torch.testing.assert_close(memory[0], torch.tensor([2 ** -0.5, 2 ** -0.5]))
    # row 2: 0.5 [0.6, 0.8] + 0.5 [1, 0] = [0.8, 0.4] -> / sqrt(0.8)
    torch.testing.assert_close(memory[2], torch.tensor([0.8, 0.4]) / 0.8 ** 0.5)
    assert torch.equal(memory[1], before[1])


def test_eta_other_than_a_half():
    memory = torch.tensor([[1.0, 0.0]])
    ema_update_(memory, torch.tensor([0]), torch.tensor([[0.0, 1.0]]), eta=0.25)
    torch.testing.assert_close(memory[0], F.normalize(torch.tensor([0.75, 0.25]), dim=0))


def test_duplicate_indices_last_occurrence_wins():
    """Rule: with an index repeated in one update, m_i <- normalise((1 - eta) m_i + eta x_last),
    m_i taken from before the update; earlier occurrences are ignored."""
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    feats = torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.6, 0.8], [0.8, 0.6]])
    ema_update_(memory, torch.tensor([0, 1, 0, 1]), feats, eta=0.5)
    torch.testing.assert_close(memory[0], F.normalize(torch.tensor([1.6, 0.8]), dim=0))   # [1,0] + [0.6,0.8]
    torch.testing.assert_close(memory[1], F.normalize(torch.tensor([0.8, 1.6]), dim=0))   # [0,1] + [0.8,0.6]


def test_an_update_with_duplicates_equals_one_with_only_their_last_occurrences():
    g = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(20, 8, generator=g), dim=1)
    feats = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    idx = torch.tensor([4, 9, 4, 17, 9, 4])
    a = memory.clone()
    ema_update_(a, idx, feats)
    b = memory.clone()
    keep = [3, 4, 5]                                            # the last 4, 17, 9 and 4
    ema_update_(b, idx[keep], feats[keep])
    assert torch.equal(a, b)


def test_last_occurrence_positions():
    assert last_occurrence_of_each(torch.tensor([5, 2, 5, 7, 2, 5])).tolist() == [5, 4, 5, 3, 4, 5]
    assert last_occurrence_of_each(torch.tensor([3])).tolist() == [0]
    idx = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(1))
    want = [max(j for j in range(300) if idx[j] == idx[i]) for i in range(300)]
    assert last_occurrence_of_each(idx).tolist() == want


def test_update_happens_outside_autograd():
    memory = init_memory(5, 3, torch.Generator().manual_seed(0))
    feats = F.normalize(torch.randn(2, 3), dim=1).requires_grad_(True)
    ema_update_(memory, torch.tensor([1, 3]), feats)
    assert not memory.requires_grad and memory.grad_fn is None
