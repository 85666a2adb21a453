"""The CUDA device a command names: a GPU index this machine does not have, or a malformed one, is
one line naming the visible GPU count; the FAISS GPU paths search on the GPU the device names."""

import pytest
import torch
from click.testing import CliRunner

from nbr_index.checks import resolve_device
from nbr_index.cli import main
from nbr_index.errors import BackendUnavailableError, InvalidParameterError
from nbr_index.faiss_backend import faiss_gpu_device
from storage import Store
from tests.helpers import unit_rows

N, DIM = 120, 8


@pytest.fixture
def store(tmp_path):
    store = Store.create_or_open(str(tmp_path / "store"), n=N, dim=DIM, dataset_id="devices",
                                 curriculum={"rounds": 4, "k": 1, "tau": 0.1, "mode": "progressive"}, chunk_rows=64)
    store.write_features(0, unit_rows(N, DIM))
    return store


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("device, start", [
    ("cuda:3", "error: device cuda:3 requested but "),   # beyond the visible GPUs (here: none at all)
    ("cuda:99", "error: device cuda:99 requested but "),
    ("cuda:-1", "error: device 'cuda:-1' is not cuda:N with N a GPU number; "),
    ("cuda:x", "error: device 'cuda:x' is not cuda:N with N a GPU number; "),
    ("cuda:", "error: device 'cuda:' is not cuda:N with N a GPU number; "),
])
def test_a_cuda_index_this_machine_lacks_is_one_line_naming_the_visible_count(store, device, start):
    if device in ("cuda:3", "cuda:99") and visible_gpus() > int(device[5:]):
        pytest.skip(f"this machine has {device}")
    result = CliRunner().invoke(main, ["rebuild", "--store", store.url, "--round", "1", "--quiet", "--device", device])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(start), result.stderr
    assert f"{visible_gpus()} visible CUDA GPU" in result.stderr and "Traceback" not in result.output, result.stderr
    assert Store.open(store.url).published_rounds() == []


def test_with_two_gpus_visible_cuda_2_names_both_and_cuda_1_is_taken(monkeypatch):
    # No GPU here: torch.cuda reports two, which is all resolve_device reads (no CUDA call follows).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(BackendUnavailableError) as refused:
        resolve_device("cuda:2")
    assert str(refused.value) == ("device cuda:2 requested but this machine has 2 visible CUDA GPUs "
                                  "(cuda:0..cuda:1): use --device cuda:0..cuda:1, cuda or cpu")
    with pytest.raises(InvalidParameterError, match=r"'cuda:-1' is not cuda:N .* 2 visible CUDA GPUs"):
        resolve_device("cuda:-1")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda")


def test_cuda_without_a_gpu_keeps_its_message():
    if visible_gpus():
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendUnavailableError) as refused:
        resolve_device("cuda")
    assert str(refused.value) == ("device cuda requested but no CUDA GPU is available (torch.cuda.is_available() "
                                  "is False: 0 visible CUDA GPUs); use --device cpu")


def test_faiss_searches_on_the_gpu_the_device_names():
    assert faiss_gpu_device(torch.device("cuda", 1)) == 1
    assert faiss_gpu_device(torch.device("cuda:3")) == 3
