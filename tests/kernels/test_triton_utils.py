"""hfx/kernels/_triton_utils.py: the launch helper that steps down pipeline stages on GPUs with less shared memory,
and the device checks that send older GPUs to the PyTorch paths."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from hfx.kernels import _triton_utils as tu  # noqa: E402


class _FakeKernel:
    """Stands in for a JIT kernel whose shared memory fits only at ``fits`` stages or fewer (the sm_86 case)."""

    class fn:  # noqa: N801 - mirrors JITFunction.fn
        __name__ = "fake_kernel"

    def __init__(self, fits: int) -> None:
        self.fits, self.calls = fits, []

    def __getitem__(self, grid):
        def run(*args, num_stages, **kwargs):
            self.calls.append(num_stages)
            if num_stages > self.fits:
                raise tu.OutOfResources(131072, 101376, "shared memory")

        return run


def test_launch_steps_down_stages_and_remembers_them():
    kernel, x = _FakeKernel(fits=2), torch.zeros(4)
    tu.launch(kernel, (1,), x, num_stages=3, BLOCK_M=128, MODE=2)
    assert kernel.calls == [3, 2]
    tu.launch(kernel, (1,), x, num_stages=3, BLOCK_M=128, MODE=2)
    assert kernel.calls == [3, 2, 2]  # the same configuration goes straight to 2
    tu.launch(kernel, (1,), x, num_stages=3, BLOCK_M=64, MODE=2)  # another configuration is tried afresh
    assert kernel.calls == [3, 2, 2, 3, 2]
    fits = _FakeKernel(fits=3)
    tu.launch(fits, (1,), x, num_stages=3, BLOCK_M=128)
    assert fits.calls == [3]


def test_launch_raises_when_not_even_one_stage_fits():
    kernel = _FakeKernel(fits=0)
    with pytest.raises(tu.OutOfResources):
        tu.launch(kernel, (1,), torch.zeros(1), num_stages=2, BLOCK_M=1)
    assert kernel.calls == [2, 1]


def test_bf16_needs_ampere():
    assert tu.dtype_runs_on(torch.bfloat16, (8, 0)) and tu.dtype_runs_on(torch.bfloat16, (9, 0))
    assert not tu.dtype_runs_on(torch.bfloat16, (7, 5))  # T4: the kernels fall back to the PyTorch paths
    assert tu.dtype_runs_on(torch.float16, (7, 5)) and tu.dtype_runs_on(torch.float32, (7, 0))
    assert tu.device_supports(torch.zeros(1, dtype=torch.bfloat16))  # CPU tensors: the interpreter decides
