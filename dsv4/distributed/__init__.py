"""Tensor, expert and data-parallel-attention parallelism over torch.distributed (NCCL on GPUs, gloo on CPU).

``parallel``: the layout and process groups; ``comm``: collectives that are no-ops at size 1; ``vocab`` and
``moe``: the model's parallel pieces; ``shard``: which slice of each checkpoint tensor a rank loads;
``batch_sync`` and ``cache_mirror``: rank 0 sends each step's batch and cache-manager calls to the other ranks;
``dp_attention``: data-parallel attention groups (rank 0's per-group cache managers, the batch split, the
logits gather); ``follower``: what the other ranks run; ``launch``: one process per rank from one command.
"""
