"""Test setup shared by every test module.

Triton kernels run under the CPU interpreter unless a CUDA device is present; the variable must be
set before any ``@triton.jit`` function is imported, so it is set here at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class RecordingAccelerator:
    """The parts of an ``accelerate.Accelerator`` a training stage's loop touches, on one CPU
    process (a stand-in for ``purify_fast.distributed.prepare_stage``'s); ``unwrap_model``, what
    ``release_stage`` calls, records what it was handed in ``released``."""

    device = torch.device("cpu")
    process_index = 0
    is_main_process = True
    distributed_type = "NO"

    def __init__(self, released: list):
        self.released = released

    def backward(self, loss):
        loss.backward()

    def reduce(self, tensor, reduction="mean"):
        return tensor

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(list(params), max_norm)

    def unwrap_model(self, model, keep_fp32_wrapper=True):
        self.released.append((model, keep_fp32_wrapper))
        return model


def fake_launch(monkeypatch, stage_module) -> list:
    """Make ``stage_module`` (training, muscle_lora, mimic) see a multi-process launch whose
    prepare_stage hands back a :class:`RecordingAccelerator`; returns the list of what its
    release_stage unwrapped."""
    import purify_fast.distributed

    released = []
    monkeypatch.setattr(stage_module, "distributed_launch", lambda: True)
    monkeypatch.setattr(purify_fast.distributed, "prepare_stage",
                        lambda model, opt, *loaders, scheduler=None:
                        (RecordingAccelerator(released), model, opt, *loaders, scheduler))
    return released


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def queued_cuda_seed():
    """The CUDA seed torch.manual_seed queued (CUDA not started: a CPU build, or a GPU machine
    before its first CUDA call), read from the callback torch keeps until CUDA starts."""
    tracker = torch.cuda._lazy_seed_tracker
    call = tracker.manual_seed_all_cb
    if call is None:
        return None
    cb = call[0]
    return dict(zip(cb.__code__.co_freevars, (c.cell_contents for c in cb.__closure__)))["seed"]


def caller_draws():
    """The next draws of a caller's global streams (torch, random, numpy): equal before and
    after a library call when the call left those streams alone."""
    import random

    import numpy as np

    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def seed_caller(seed):
    """Seed a caller's global streams (torch, random, numpy)."""
    import random

    import numpy as np

    torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
