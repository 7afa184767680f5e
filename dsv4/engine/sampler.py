"""From one row of logits per request to one token per request (plus its logprobs), with failures isolated.

The batched path makes one call to :func:`dsv4.ops.sampling.sample` (or the plain greedy argmax when every
row is greedy) and one to :func:`compute_logprobs`. If that raises, every row is sampled again on its own,
from generator states rewound to where they were, so the rows that work get exactly the token the batch
would have given them and only the failing request is lost. Logits on a CUDA device go through the kernels of
:mod:`dsv4.ops.sampling_triton` (same signatures, same tokens).

Seeds (:func:`request_generator`): a request with ``params.seed`` samples from a generator seeded with it,
so its samples do not depend on the rest of the batch; one without draws from a generator seeded with a
hash of ``(engine seed, request id)``: reproducible for a given engine seed and id, different across ids.
Greedy requests need no generator.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from types import ModuleType

import torch

from dsv4.engine.request import Request
from dsv4.engine.sampling_params import SamplingParams
from dsv4.ops import sampling
from dsv4.ops.dispatch import triton_available
from dsv4.ops.sampling import compute_logprobs, make_generator

log = logging.getLogger(__name__)


@dataclass
class Sampled:
    """One request's draw: the token, its raw logprob and its top-n alternatives (when asked for)."""

    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


def request_seed(params: SamplingParams, engine_seed: int, request_id: str) -> int:
    """``params.seed`` if set, else 63 bits of blake2b over ``"{engine_seed}/{request_id}"``."""
    if params.seed is not None:
        return params.seed
    digest = hashlib.blake2b(f"{engine_seed}/{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def request_generator(params: SamplingParams, engine_seed: int, request_id: str,
                      device: torch.device) -> torch.Generator | None:
    """The request's own random stream (None for greedy requests)."""
    if params.greedy:
        return None
    return make_generator(request_seed(params, engine_seed, request_id), device)


@functools.cache
def _kernels(device_type: str) -> ModuleType:
    """The sampling implementation for logits on ``device_type``: the Triton kernels on CUDA (argmax in one
    pass instead of three), the references elsewhere; both give the same tokens."""
    if device_type == "cuda" and triton_available():
        from dsv4.ops import sampling_triton

        return sampling_triton
    return sampling


def sample_batch(reqs: list[Request], logits: torch.Tensor) -> list[Sampled]:
    """One token per request from ``logits`` [R, V] fp32 (row i belongs to ``reqs[i]``)."""
    dev = logits.device
    ops = _kernels(dev.type)
    if all(r.params.greedy for r in reqs):
        ids = ops.greedy(logits)
    else:
        temp = torch.tensor([r.params.temperature for r in reqs], dtype=torch.float32, device=dev)
        top_k = torch.tensor([r.params.top_k_or_off for r in reqs], dtype=torch.int64, device=dev)
        top_p = torch.tensor([r.params.top_p for r in reqs], dtype=torch.float32, device=dev)
        min_p = torch.tensor([r.params.min_p for r in reqs], dtype=torch.float32, device=dev)
        ids = ops.sample(logits, temp, top_k, top_p, min_p, [r.generator for r in reqs])
    want = [r.params.logprobs for r in reqs if r.params.logprobs is not None]
    lp = compute_logprobs(logits, ids, max(want)) if want else None
    ids_host = ids.tolist()  # the one host sync of a step: the scheduler needs the tokens
    out = [Sampled(t) for t in ids_host]
    if lp is not None:
        token_lp, top_ids, top_lp = (t.tolist() for t in lp)
        for i, r in enumerate(reqs):
            n = r.params.logprobs
            if n is None:
                continue
            out[i].logprob = token_lp[i]
            if n:
                out[i].top_logprobs = dict(zip(top_ids[i][:n], top_lp[i][:n], strict=True))
    return out


def sample_isolated(reqs: list[Request], logits: torch.Tensor) -> list[Sampled | Exception]:
    """:func:`sample_batch`, but a failure costs only the rows that fail on their own (they get the error)."""
    states = [r.generator.get_state() if r.generator is not None else None for r in reqs]
    try:
        return list(sample_batch(reqs, logits))
    except Exception:
        log.exception("batched sampling failed; sampling %d requests one by one", len(reqs))
    out: list[Sampled | Exception] = []
    for i, (r, state) in enumerate(zip(reqs, states, strict=True)):
        if r.generator is not None and state is not None:
            r.generator.set_state(state)
        try:
            out.append(sample_batch([r], logits[i : i + 1])[0])
        except Exception as e:
            out.append(e)
    return out
