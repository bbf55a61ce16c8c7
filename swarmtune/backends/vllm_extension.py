"""Inside vLLM's worker process: swarmtune's derived weights and low-rank adapters, received as bytes."""

from __future__ import annotations

import os
import select
import signal
import threading
from typing import Any, Sequence

import torch

# On the wire (collective_rpc): plain lists, since tensors do not survive every vLLM serializer.
#   weight:  [names, dtype, shape, data]  names: every checkpoint name of the tensor (tied ones too)
#   adapters of one module: [module, lora_a data, lora_a shape, lora_b data, lora_b shape], the shapes
#   (adapters, r, in) and (adapters, out, r): adapter k's lora_A and lora_B are the k-th slices
WireWeight = Sequence[Any]
WireModule = Sequence[Any]


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's raw bytes (any dtype, bfloat16 too), row-major."""
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """The tensor tensor_bytes wrote."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(tuple(shape))


def wire_weight(names: Sequence[str], tensor: torch.Tensor) -> list[Any]:
    return [list(names), str(tensor.dtype).removeprefix("torch."), list(tensor.shape), tensor_bytes(tensor)]


def wire_adapters(module: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> list[Any]:
    """One module's adapters on the wire, stacked: two serializations a module, not two per adapter and module."""
    return [module, tensor_bytes(lora_a), list(lora_a.shape), tensor_bytes(lora_b), list(lora_b.shape)]


def peft_adapters(modules: Sequence[WireModule], dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """Per adapter, its tensors under the PEFT checkpoint names vLLM's loader expects (views of the wire's stacks)."""
    stacks = [
        (module, tensor_from_bytes(a_data, dtype, a_shape), tensor_from_bytes(b_data, dtype, b_shape))
        for module, a_data, a_shape, b_data, b_shape in modules
    ]
    adapters: list[dict[str, torch.Tensor]] = [{} for _ in range(len(stacks[0][1]) if stacks else 0)]
    for module, lora_a, lora_b in stacks:
        for k, tensors in enumerate(adapters):
            tensors[f"base_model.model.{module}.lora_A.weight"] = lora_a[k]
            tensors[f"base_model.model.{module}.lora_B.weight"] = lora_b[k]
    return adapters


def named_weights(weights: Sequence[WireWeight]) -> dict[str, torch.Tensor]:
    """Checkpoint name -> tensor, each tied alias naming the same tensor."""
    named = {}
    for names, dtype, shape, data in weights:
        tensor = tensor_from_bytes(data, getattr(torch, dtype), shape)
        named.update((name, tensor) for name in names)
    return named


class SwarmtuneWorkerExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`); the engine calls these through collective_rpc.

    The worker keeps the center's weights (checkpoint format): a member's reload sends only what it
    changes, and the center comes back without a transfer.
    """

    model_runner: Any
    swarmtune_center: dict[str, torch.Tensor]

    def swarmtune_load_weights(self, weights: Sequence[WireWeight], keep_as_center: bool) -> int:
        """Reload the model with the center overridden by `weights` (kept as the new center when
        keep_as_center). Registered adapters are dropped (vLLM's reload does so). Returns tensors loaded."""
        overrides = named_weights(weights)
        if keep_as_center:
            self.swarmtune_center = {**getattr(self, "swarmtune_center", {}), **overrides}
            overrides = {}
        center = getattr(self, "swarmtune_center", None)
        if center is None:
            raise RuntimeError("swarmtune_load_weights: load every tensor as the center first")
        merged = {**center, **overrides}
        self.model_runner.reload_weights(weights_iterator=iter(merged.items()), is_checkpoint_format=True)
        return len(merged)

    def swarmtune_watch_owner(self, owner_pid: int) -> None:
        """End this engine when the swarmtune worker that started it dies, SIGKILL included: vLLM's
        engine core outlives a killed parent on CPU (a clean exit shuts it down without this)."""
        engine_core = os.getppid()
        threading.Thread(target=end_with_owner, args=(owner_pid, engine_core), name="swarmtune-owner", daemon=True).start()

    def swarmtune_lora_modules(self) -> list[str]:
        """Module name suffixes (checkpoint names) this model accepts LoRA weights for."""
        manager = self.model_runner.lora_manager._adapter_manager
        packed = manager.packed_modules_mapping
        names: list[str] = []
        for module in manager.supported_lora_modules:
            names += packed.get(module, [module])
        return sorted(set(names))

    def swarmtune_set_adapters(self, rank: int, adapter_ids: Sequence[int], modules: Sequence[WireModule], dtype: str) -> int:
        """Replace every registered adapter by one per id, the k-th id's tensors the k-th slices of
        `modules` (lora_A = Bᵀ, lora_B = σ·A; scaling 1). Returns the number registered."""
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper

        worker_manager = self.model_runner.lora_manager
        worker_manager.remove_all_adapters()
        manager = worker_manager._adapter_manager
        mapper = getattr(manager.model, "hf_to_vllm_mapper", None)
        torch_dtype = getattr(torch, dtype)
        suffixes = sorted({entry[0].rsplit(".", 1)[-1] for entry in modules})
        helper = PEFTHelper.from_dict({"r": rank, "lora_alpha": rank, "target_modules": suffixes})
        for adapter_id, tensors in zip(adapter_ids, peft_adapters(modules, torch_dtype), strict=True):
            lora = LoRAModel.from_lora_tensors(
                adapter_id,
                tensors,
                helper,
                device="cpu",
                dtype=torch_dtype,
                weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
            )
            manager.add_adapter(lora)
        return len(adapter_ids)


def end_with_owner(owner_pid: int, engine_core_pid: int) -> None:
    """Wait for the owner's exit (a pidfd: no polling, no pid reuse), then kill the engine core, and this process."""
    owner = os.pidfd_open(owner_pid)
    select.select([owner], [], [])
    if engine_core_pid != owner_pid:  # a single-process executor runs this worker inside the owner itself
        os.kill(engine_core_pid, signal.SIGKILL)
    os._exit(0)  # the owner is gone: nothing here is worth a clean shutdown
