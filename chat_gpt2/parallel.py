"""Training on several processes under torchrun: DDP (every rank holds the whole model, its
gradients and AdamW state) or FSDP2 (torch.distributed.fsdp.fully_shard: each transformer block
and the rest of the model sharded across the ranks, gathered for a block's forward and backward).
Checkpoints are the same either way: a full state dict gathered on rank 0, which one process
loads."""
import warnings

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from .errors import ConfigError
from .lora import lora_settings

PARALLEL_CHOICES = ("ddp", "fsdp")
# the full state dict, gathered to rank 0's CPU memory (other ranks get {})
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def check_parallel(cfg, rank):
    """Whether this run shards with FSDP (--parallel=fsdp under torchrun: rank >= 0); refuses what
    it cannot shard. A single process (rank -1) ignores --parallel."""
    if cfg["parallel"] not in PARALLEL_CHOICES:
        raise ConfigError(f"--parallel must be one of {', '.join(PARALLEL_CHOICES)}, "
                          f"got {cfg['parallel']!r}")
    if rank < 0 or cfg["parallel"] != "fsdp":
        return False
    if lora_settings(cfg):
        raise ConfigError("--parallel=fsdp does not train LoRA adapters (their checkpoint holds "
                          "the adapters only, the frozen base is small to replicate): use "
                          "--parallel=ddp")
    if cfg.get("preference_loss"):
        # DPO's frozen reference is a second, unsharded model; not tested sharded yet
        raise ConfigError("--parallel=fsdp does not train on preference pairs yet: use "
                          "--parallel=ddp")
    if cfg["sample_max_tokens"] > 0:
        # rank 0 alone would run the sharded model, whose every forward gathers from all ranks
        if rank == 0:
            print("--parallel=fsdp: no sample reply at evals (sample_max_tokens=0); sample.py "
                  "reads the checkpoints")
        cfg["sample_max_tokens"] = 0
    return True


def shard_model(build, run):
    """The model to train, from build(). FSDP: built on rank 0 only (on the CPU; the others build
    its shape on the meta device, no weights), each block sharded and the rest (embeddings, the
    tied LM head, ln_f, a classifier's head) in one root group, which keeps wte and lm_head one
    Parameter; then rank 0's weights are broadcast a tensor at a time, each rank keeping its shard.
    So every rank starts from the weights a single process would, and no other rank holds a whole
    model. bf16 compute with fp32 gradient reduction on CUDA. Other runs: build()'s model."""
    if not run["fsdp"]:
        return build()
    with warnings.catch_warnings(), torch.device("cpu" if run["master"] else "meta"):
        # a checkpoint's weights copied into the meta shape are dropped, as they should be
        warnings.filterwarnings("ignore", message=".*to a meta parameter.*no-op")
        model = build()
    full = model.state_dict() if run["master"] else {}  # rank 0's whole weights, until broadcast
    policy = MixedPrecisionPolicy()
    if run["device"].startswith("cuda") and run["dtype"] == "bfloat16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # moves rank 0's shards to the device
    if not run["master"]:
        model.to_empty(device=run["device"])
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                               broadcast_from_rank0=True))
    return model


def replicate(model, run):
    """DDP under torchrun unless the model is sharded (FSDP); one process: the model as is."""
    if not run["ddp"] or run["fsdp"]:
        return model
    return DDP(model, device_ids=[run["device"]] if run["device"].startswith("cuda") else None)


def gathered_state(model, optimizer, run):
    """FSDP: {"model": full weights, "optimizer": full AdamW state (by parameter name)} on rank 0,
    {} elsewhere; every rank must call this (it gathers). Other runs: {} (the caller reads its own
    model's state)."""
    if not run["fsdp"]:
        return {}
    state = {"model": get_model_state_dict(model, options=FULL)}
    if optimizer is not None and optimizer.state:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=FULL)
    elif optimizer is not None:  # torch would take a zero step to make a state (AdamW's step 1)
        names = {id(p): name for name, p in model.named_parameters()}
        state["optimizer"] = {"state": {}, "param_groups": [
            {**group, "params": [names[id(p)] for p in group["params"]]}
            for group in optimizer.param_groups]}
    return state if run["master"] else {}


def load_optimizer_state(model, optimizer, state, run):
    """A checkpoint's optimizer state into this run's optimizer: under FSDP rank 0's full state
    broadcast a tensor at a time, each rank keeping its shard. The two layouts differ (FSDP names
    the parameters, DDP numbers them), so --parallel cannot change on resume. A state saved before
    the first step is the fresh optimizer's (torch's loader would take a zero step to make one:
    AdamW's step 1)."""
    by_name = any(isinstance(p, str) for group in state["param_groups"] for p in group["params"])
    if by_name != run["fsdp"]:
        saved = "fsdp" if by_name else "ddp (or one process)"
        raise ConfigError(f"the run being resumed was trained with --parallel={saved}: resume it "
                          f"the same way")
    if run["fsdp"] and state["state"]:
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))
    elif not run["fsdp"]:
        optimizer.load_state_dict(state)


def rng_of_ranks(data_rng, run):
    """Every rank's RNG states (torch, data batches, CUDA), gathered to all (every rank calls this),
    so a resume on the same world size continues each rank's streams; one process: None."""
    if not run["ddp"]:
        return None
    mine = {"torch": torch.get_rng_state(), "data": data_rng.get_state()}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state()
    states = [None] * run["world"]
    dist.all_gather_object(states, mine)
    return states


def agreed_signal(signum, run):
    """The signal any rank caught (the largest number; None if none did), so that every rank stops
    at the same step and takes part in the last save; one process: its own."""
    if not run["ddp"]:
        return signum
    caught = torch.tensor([signum or 0], device=run["device"])
    dist.all_reduce(caught, op=dist.ReduceOp.MAX)
    return int(caught.item()) or None


def local_part(tensor):
    """The part of a tensor this rank holds: its shard under FSDP (a DTensor), else itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
