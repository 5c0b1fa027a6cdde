"""The numerics a GPU run uses, run on the CPU: bf16 autocast, a fully spilled cache, channels-last, share_suffix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import modelstitch as ms
from modelstitch import data, zoo
from modelstitch.train import ActivationCache


def test_a_bf16_cache_spills_to_disk_and_reads_back_exactly():
    rows = torch.randn(6, 3, 2).to(torch.bfloat16)
    with ActivationCache(6, memory_budget=0) as cache:
        cache.write("a", 0, rows[:4])
        cache.write("a", 4, rows[4:])
        assert cache.bytes_in_memory == 0 and cache.bytes_on_disk == rows.numel() * 2
        got = cache.gather("a", torch.tensor([5, 0, 3]))
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, rows[[5, 0, 3]])


def test_the_cache_stores_the_dtype_it_is_asked_for():
    with ActivationCache(2, dtype=torch.bfloat16, memory_budget=0) as cache:
        cache.write("x", 0, torch.ones(2, 3))
        cache.write("y", 0, torch.tensor([1, 2]))
        assert cache.gather("x", torch.tensor([0])).dtype == torch.bfloat16
        assert cache.gather("y", torch.tensor([1])).dtype == torch.int64  # labels stay integers


def test_recipe_amp_runs_cpu_autocast_only_when_asked():
    cpu = torch.device("cpu")
    assert not ms.Recipe().uses_amp(cpu)
    assert ms.Recipe(amp=True).uses_amp(cpu)
    with ms.Recipe(amp=True).autocast(cpu):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = zoo.small_resnet("R1111", width=8)
    recipe = zoo.CLASSIFIER_RECIPE.replace(lr=0.05, batch_size=64, base_batch_size=64, epochs=2, channels_last=False)
    zoo.train_classifier(model, data.digits(), recipe=recipe, device="cpu", progress=False)
    return model.eval()


def _study(net, out, **options):
    train, test = data.subset(data.digits(), 512), data.digits(train=False)
    layers = ["layer2.0", "layer3.0", "layer4.0"]
    return ms.Study(
        {"A": net, "A random": zoo.random_control("R1111", seed=1, width=8)},
        train_data=train,
        test_data=test,
        out=out,
        layers={"A": layers, "A random": layers},
        controls={"A": "A random"},
        recipe=ms.Recipe(lr=0.05, batch_size=64, base_batch_size=64, epochs=2, amp=True, channels_last=True),
        **{"device": "cpu", **options},
    ).run(progress=False)


@pytest.mark.slow
def test_the_gpu_path_on_the_cpu_trains_and_spilling_changes_nothing(net, tmp_path):
    spilled = _study(net, tmp_path / "spilled", memory_budget=0, share_suffix=True)
    in_memory = _study(net, tmp_path / "in_memory", share_suffix=True)
    trained, control = spilled.matrix("A", "A"), spilled.matrix("A random", "A random")
    assert np.isfinite(trained).all() and np.isfinite(control).all()
    assert np.diag(trained).mean() > np.diag(control).mean() + 0.1
    # the cache itself reads back bitwise (test above); whole studies agree to a test image or so, since bf16
    # CPU kernels may round differently for buffers at different addresses (memory-mapped vs allocated)
    np.testing.assert_allclose(trained, in_memory.matrix("A", "A"), atol=0.01)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_gpu_path_on_cuda(net, tmp_path):
    cuda = _study(net, tmp_path / "cuda", memory_budget=0, share_suffix=True, device="cuda")
    cpu = _study(net.cpu(), tmp_path / "cpu", memory_budget=0, share_suffix=True)
    assert np.isfinite(cuda.matrix("A", "A")).all()
    np.testing.assert_allclose(cuda.matrix("A", "A"), cpu.matrix("A", "A"), atol=0.05)  # bf16 on two devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_spilled_cache_gives_its_rows_on_its_device():
    # a CUDA study with memory_budget=0 once fed the stitch CPU rows from the memory-mapped file (a dtype error
    # under autocast, which casts only CUDA tensors); every row must come back on the cache's device
    rows = torch.randn(4, 3)
    with ActivationCache(4, memory_budget=0, device="cuda") as cache:
        cache.write("a", 0, rows.cuda())
        cache.write("y", 0, torch.arange(4).cuda())
        assert cache.bytes_in_memory == 0
        got, labels = cache.gather("a", torch.tensor([2, 0])), cache.gather("y", torch.tensor([3]))
    assert got.device.type == labels.device.type == "cuda"
    assert torch.equal(got.cpu(), rows[[2, 0]]) and labels.item() == 3
