"""Tensor and expert parallelism over torch.distributed (NCCL on GPUs, gloo on CPU).

``parallel``: the layout and process groups; ``comm``: collectives that are no-ops at size 1; ``vocab`` and
``moe``: the model's parallel pieces; ``batch_sync``: rank 0 sends each step's batch to the other ranks;
``follower``: what the other ranks run; ``launch``: one process per rank from one command.
"""
