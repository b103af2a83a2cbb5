"""Running on several processes: the process group and device of each rank (:mod:`.setup`).

DDP is PyTorch's own (``torch.nn.parallel.DistributedDataParallel``); the training loop wraps the
model with it when ``WORLD_SIZE > 1`` (``torchrun``). FSDP2 (``fully_shard``) for wrapped models
is in :mod:`.fsdp`, sharded (DCP) checkpoints in :mod:`.dcp`; their names are exported here and
imported on first use (``.dcp`` reads ``lowrank.run``, which imports this package).
"""

from .setup import DistInfo, Heartbeat, end_process_group, init_distributed, is_comm_failure, parameter_hash, stalled_message, wrap_ddp

__all__ = ["DistInfo", "Heartbeat", "end_process_group", "init_distributed", "is_comm_failure", "parameter_hash", "stalled_message", "wrap_ddp"]

# FSDP2 and DCP, imported when first used (lowrank.run imports this package, lowrank.distributed.dcp imports lowrank.run).
_LAZY = {
    **dict.fromkeys(("shard_model", "decoder_layers", "is_sharded", "sharded_layer_event", "sharded_layer_events",
                     "ShardedMemory", "fsdp_memory_per_rank"), "fsdp"),
    **dict.fromkeys(("save_sharded_checkpoint", "load_sharded_checkpoint", "is_sharded_checkpoint", "dcp_to_state_dict",
                     "export_model_weights", "SafeFileSystemReader"), "dcp"),
}
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
