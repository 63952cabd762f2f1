"""The one device resolver: the names accepted, and the CPU under every name torch gives it."""
import pytest
import torch

from sage_fast.devices import DeviceError, check_device, resolve_device


@pytest.mark.parametrize("name", ["auto", "cpu", "cpu:0", "cuda", "cuda:3"])
def test_accepted_names(name):
    assert check_device(name) == name


@pytest.mark.parametrize("name", ["gpu", "cpu:1", "cuda:", "CUDA", "", None, 0])
def test_refused_names_say_what_is_accepted(name):
    with pytest.raises(DeviceError, match="cuda:N"):
        check_device(name)


def test_the_cpu_under_any_of_its_names_is_one_device():
    # a Trainer under torchrun on CPU calls its device cpu:0; tensors and generators want plain cpu
    assert resolve_device("cpu:0") == resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu", 0)) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_gpu_is_refused_with_the_way_out():
    with pytest.raises(DeviceError, match="--device cpu"):
        resolve_device("cuda:0")
