"""From one row of logits per request to one token per request (plus its logprobs), with failures isolated.

The batched path makes one sampling call (or the plain greedy argmax when every row is greedy) and one to
:func:`compute_logprobs`. If that raises, every row is sampled again on its own, from generator states rewound
to where they were, so the rows that work get exactly the token the batch would have given them and only the
failing request is lost.

Seeds (:func:`request_generator`): a request with ``params.seed`` samples from a generator seeded with it,
so its samples do not depend on the rest of the batch; one without draws from a generator seeded with a
hash of ``(engine seed, request id)``: reproducible for a given engine seed and id, different across ids.
Greedy requests need no generator.

Where the noise comes from depends on the device of the logits (both draw from the same filtered distribution):

- CPU: :func:`dsv4.ops.sampling.sample`, each row's noise drawn from the request's generator;
- CUDA: the kernels of :func:`dsv4.ops.sampling_triton.sample`: no sort, no host sync, and counter-based noise,
  a function of the request's seed (its generator's ``initial_seed``) and of how many tokens it has sampled
  before this one (a verify's rows count on from there). Same seed, same tokens, in any batch; and a recomputed
  or re-verified position draws the same noise again.
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
def _kernels(device_type: str) -> ModuleType | None:
    """The Triton kernels for logits on ``device_type`` (CUDA with Triton), else None (the references)."""
    if device_type == "cuda" and triton_available():
        from dsv4.ops import sampling_triton

        return sampling_triton
    return None


def _seed_word(r: Request) -> int:
    """The request's seed as the int64 holding its 64 bits (0 for greedy requests: they draw no noise)."""
    s = r.generator.initial_seed() if r.generator is not None else 0
    return s - 2**64 if s >= 2**63 else s


def _steps(reqs: list[Request]) -> list[int]:
    """Per row, the index of the token it samples: tokens already generated, plus earlier rows of the same request
    (a verify samples 1 + drafts rows in order)."""
    seen: dict[int, int] = {}
    out = []
    for r in reqs:
        n = seen.get(id(r), 0)
        out.append(len(r.output_ids) + n)
        seen[id(r)] = n + 1
    return out


def to_device(values: list, device: torch.device | str, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``values`` as a tensor on ``device`` without a host sync: on CUDA through pinned memory and a non-blocking
    copy (a plain ``torch.tensor(..., device="cuda")`` waits for the stream, so the host could never run ahead of
    the GPU); the caching host allocator keeps the pinned block until the copy has run."""
    if torch.device(device).type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def sample_ids(reqs: list[Request], logits: torch.Tensor) -> torch.Tensor:
    """One token id per row of ``logits`` [R, V] fp32 (row i belongs to ``reqs[i]``), left on the device: no host
    sync (the per-row parameters go up through :func:`to_device`)."""
    dev = logits.device
    kernels = _kernels(dev.type)
    if all(r.params.greedy for r in reqs):
        return (kernels or sampling).greedy(logits)
    temp = to_device([r.params.temperature for r in reqs], dev, torch.float32)
    top_k = to_device([r.params.top_k_or_off for r in reqs], dev)
    top_p = to_device([r.params.top_p for r in reqs], dev, torch.float32)
    min_p = to_device([r.params.min_p for r in reqs], dev, torch.float32)
    if kernels is not None:
        seeds = to_device([_seed_word(r) for r in reqs], dev)
        steps = to_device(_steps(reqs), dev)
        return kernels.sample(logits, temp, top_k, top_p, min_p, seeds, steps)
    return sampling.sample(logits, temp, top_k, top_p, min_p, [r.generator for r in reqs])


def sample_batch(reqs: list[Request], logits: torch.Tensor) -> list[Sampled]:
    """One token per request from ``logits`` [R, V] fp32 (row i belongs to ``reqs[i]``)."""
    ids = sample_ids(reqs, logits)
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
