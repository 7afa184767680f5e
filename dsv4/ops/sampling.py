"""Token sampling: the plain PyTorch reference, vectorised over requests.

``sample`` turns one row of logits per request into one token id per request:

1. rows with temperature 0 take the greedy argmax (ties to the lowest id);
2. other rows are scaled by ``1/T``, then filtered in this order (as HF, vLLM and SGLang do):
   top-k (keep the ``k`` largest), top-p (on the top-k-renormalised distribution, keep the smallest
   prefix of the sorted tokens whose mass is >= ``top_p``; the top token always stays), min-p (drop
   tokens with ``p < min_p * p_max``; the ratio does not change under renormalisation, so min-p
   commutes with the other two); the masses are fp64, so the cut-offs do not hang on a summation order;
3. a token is drawn by an exponential race: ``argmax(log p - log E)`` with ``E ~ Exp(1)`` per token,
   which draws from ``p`` exactly. Each row's noise comes from that row's own ``torch.Generator``, so a
   seeded request draws the same tokens whatever else is in the batch and in whichever row it sits.

``sample_seeded`` is the same filters and race with counter-based noise instead of generators: Philox-4x32-10
keyed by the request's seed, the counter holding the token id and the request's step (tokens sampled so far),
so the noise is a pure function of (seed, step, token id): no generator state, nothing shared by the batch.
It is the reference of the CUDA kernels in :mod:`dsv4.ops.sampling_triton`, which compute the same noise.

Nothing here reads a device value on the host: the filters are built from one sort per row and
masks. (Capturing ``sample`` in a CUDA graph would also need the generators registered with the graph.)
"""

from __future__ import annotations

import torch
from torch import Tensor


def greedy(logits: Tensor, out: Tensor | None = None) -> Tensor:
    """Argmax with ties to the lowest index.

    NOTE: ``torch.argmax`` does not promise which of several equal maxima it returns (CUDA reductions
    may differ from CPU), so we take the max and then the first index equal to it.

    Args:
        logits: [R, V] float.
        out: optional preallocated [R] integer buffer (int32 or int64) to write the ids into.
    Returns:
        [R] token ids: ``out`` when given, else a new int64 tensor. A row holding any NaN returns V-1 (its max
        is NaN, equal to nothing) rather than an out-of-range id.
    """
    v = logits.shape[-1]
    m = logits.amax(dim=-1, keepdim=True)
    ids = torch.arange(v, device=logits.device, dtype=torch.int64)
    first = torch.where(logits == m, ids, v).amin(dim=-1).clamp_(max=v - 1)
    return first if out is None else out.copy_(first)


def filter_mask(logits: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """Which tokens survive top-k, then top-p, then min-p.

    Args:
        logits: [R, V] fp32, already divided by the temperature.
        top_k: [R] int; <= 0 (or >= V) keeps all.
        top_p: [R] float in (0, 1]; 1 keeps all.
        min_p: [R] float in [0, 1]; 0 keeps all.
    Returns:
        [R, V] bool, True for kept tokens; every row keeps at least its top token.
    """
    r, v = logits.shape
    # Stable sort: among equal logits the lower id ranks first, so the kept set is deterministic.
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    rank = torch.arange(v, device=logits.device).expand(r, v)

    k = top_k.to(torch.int64).view(r, 1)
    k = torch.where(k <= 0, v, k)
    keep = rank < k

    # NOTE: the masses are fp64 weights w = exp(x - x_max) (the top token weighs exactly 1), so the cut-offs do
    # not depend on how a sum is ordered: an fp32 cumsum over 1e5 tokens is off by ~1e-5 of the mass, enough to
    # move the top-p boundary by a token, and the kernels of sampling_triton.py sum in another order.
    x = sorted_logits.double()
    w = torch.exp(x - x[:, :1]).masked_fill(~keep, 0.0)
    z = w.sum(dim=-1, keepdim=True)  # the top-k survivors' mass: top-p renormalises over them
    mass_before = torch.cumsum(w, dim=-1).roll(1, dims=-1)  # exclusive prefix sum
    mass_before[:, 0] = 0.0
    # NOTE: `mass_before < top_p * z` keeps rank 0 (mass 0 < top_p since top_p > 0) and stops at the first
    # rank where the mass already reached top_p: the smallest set whose mass is >= top_p.
    keep &= mass_before < top_p.view(r, 1).double() * z
    # top_p == 1 keeps every top-k survivor
    keep |= (top_p.view(r, 1) >= 1) & (rank < k)

    # min-p against the most likely token (weight 1): the ratio p / p_max is the same before and after top-k
    keep &= w >= min_p.view(r, 1).double()
    keep[:, 0] = True

    return torch.empty_like(keep).scatter_(1, order, keep)


def exponential_noise(shape: tuple[int, int], generators: list[torch.Generator | None], device: torch.device) -> Tensor:
    """-log(E) per element with E ~ Exp(1), row i drawn from ``generators[i]``.

    Rows with no generator share one draw from the default stream. A row with a generator always
    consumes exactly V uniforms per call, so its stream advances the same way in any batch.

    Returns:
        [R, V] fp32.
    """
    r, v = shape
    u = torch.empty(shape, dtype=torch.float32, device=device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        u[unseeded] = torch.rand((len(unseeded), v), device=device)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand(v, generator=g, device=device)
    # NOTE: torch.rand can return exactly 0 (about once per 2^24 draws, so often at V ~ 1e5). Clamping
    # keeps U in (0, 1), hence E = -log(U) in (0, 88]: never 0, which would give -log(E) = +inf and win
    # the race even for a filtered token (-inf + inf = NaN).
    e = -torch.log(u.clamp_min_(torch.finfo(torch.float32).tiny))
    return -torch.log(e)


def sample(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    min_p: Tensor,
    generators: list[torch.Generator | None],
    argmax=None,
) -> Tensor:
    """Draw one token per request.

    Args:
        logits: [R, V] fp32 raw logits (the caller upcasts bf16 logits first).
        temperature: [R] float; 0 means greedy for that row.
        top_k: [R] int; <= 0 is off.
        top_p: [R] float in (0, 1].
        min_p: [R] float in [0, 1].
        generators: R entries; each must live on ``logits.device``. ``None`` uses the default stream.
        argmax: the row-wise argmax used (default :func:`greedy`; the Triton module passes its kernel).
    Returns:
        [R] int64 token ids.

    Every row consumes its generator's noise, greedy rows included, so a request's stream does not
    depend on the temperature of others. When all rows are greedy the caller should call ``greedy``.
    """
    argmax = argmax or greedy
    r, v = logits.shape
    if len(generators) != r:
        raise ValueError(f"sample: {len(generators)} generators for {r} rows")
    logits = logits.float()
    is_greedy = temperature.view(r, 1) == 0
    # Greedy rows divide by 1 so they stay finite; their sampled value is discarded below.
    t = torch.where(is_greedy, 1.0, temperature.view(r, 1).to(torch.float32))
    scaled = logits / t
    keep = filter_mask(scaled, top_k, top_p, min_p)
    logp = torch.log_softmax(scaled.masked_fill(~keep, float("-inf")), dim=-1)
    race = logp + exponential_noise((r, v), generators, logits.device)
    sampled = argmax(race)
    return torch.where(is_greedy.view(r), argmax(logits), sampled)


# ---- counter-based noise: a request's (seed, step) and a token id determine its noise, nothing else ----------
PHILOX_LANES = 256  # the noise of tokens [1024 g, 1024 g + 1024) comes from counters 256 g .. 256 g + 255
_M32 = 0xFFFFFFFF


def _umulhi(a: Tensor, b: int) -> Tensor:
    """High 32 bits of a * b for uint32 values held in int64 (16-bit halves, so nothing overflows)."""
    ah, al, bh, bl = a >> 16, a & 0xFFFF, b >> 16, b & 0xFFFF
    mid = ah * bl + al * bh + ((al * bl) >> 16)
    return ah * bh + (mid >> 16)


def philox4x32(c: list[Tensor], k0: Tensor, k1: Tensor, rounds: int = 10) -> list[Tensor]:
    """Philox-4x32 (Salmon et al. 2011) on uint32 values held in int64 tensors, as ``tl.philox`` computes it.

    Args:
        c: the four counter words (broadcastable int64 tensors in [0, 2^32)).
        k0, k1: the key words (low and high halves of the seed).
    Returns:
        the four output words, int64 in [0, 2^32).
    """
    c0, c1, c2, c3 = c
    for _ in range(rounds):
        n0 = _umulhi(c2, 0xCD9E8D57) ^ c1 ^ k0
        n2 = _umulhi(c0, 0xD2511F53) ^ c3 ^ k1
        c1, c3 = (c2 * 0xCD9E8D57) & _M32, (c0 * 0xD2511F53) & _M32
        c0, c2 = n0, n2
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return [c0, c1, c2, c3]


def counter_gumbel(seeds: Tensor, steps: Tensor, v: int) -> Tensor:
    """Gumbel noise -log(-log U) for every token of every row, from each row's (seed, step) alone.

    Token i of a row takes output word ``(i % 1024) // 256`` of Philox-4x32-10 keyed by the row's seed at counter
    ``(256 * (i // 1024) + i % 256, step_lo, step_hi, 0)``; U = ((word >> 8) + 1/2) / 2^24 lies in (0, 1) strictly,
    so the noise is finite. The logs are taken in fp64 and rounded to fp32: fp32 logs differ by an ulp between
    libraries (torch's CPU kernels, numpy, CUDA), the fp64 ones round to the same fp32 value but once in ~2^29.

    Args:
        seeds: [R] int64 (63-bit seeds), steps: [R] int64 (tokens the request has sampled so far).
    Returns:
        [R, V] fp32.
    """
    dev = seeds.device
    i = torch.arange(v, device=dev, dtype=torch.int64)
    group, within = i // (4 * PHILOX_LANES), i % (4 * PHILOX_LANES)
    counter = (group * PHILOX_LANES + within % PHILOX_LANES).view(1, v)
    word = (within // PHILOX_LANES).view(1, v)
    s, st = seeds.to(torch.int64).view(-1, 1), steps.to(torch.int64).view(-1, 1)
    zero = torch.zeros_like(st)
    out = philox4x32([counter, st & _M32, (st >> 32) & _M32, zero], s & _M32, (s >> 32) & _M32)
    bits = torch.where(word == 0, out[0], torch.where(word == 1, out[1], torch.where(word == 2, out[2], out[3])))
    u = ((bits >> 8).double() + 0.5) * 2.0**-24
    return (-torch.log(-torch.log(u))).float()


def sample_seeded(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor, seeds: Tensor,
                  steps: Tensor) -> Tensor:
    """:func:`sample` with counter-based noise: the reference of ``sampling_triton.sample``.

    The kept set is :func:`filter_mask`'s; the token is ``argmax(x + G)`` over it (ties to the lowest id), with
    ``x = logits / T`` and ``G`` from :func:`counter_gumbel`: an exponential race again (log p differs from x by a
    per-row constant), so each row draws from the same filtered distribution as :func:`sample`. A request's noise
    is a function of its seed and step only: the same whatever else is in the batch, and no generator state.
    Sampled rows holding a NaN, or whose max is +-inf, give V-1 as :func:`sample` does; greedy rows (T = 0) are
    :func:`greedy`.

    Args:
        logits: [R, V] float; temperature, top_p, min_p: [R] float; top_k: [R] int; seeds, steps: [R] int64.
    Returns:
        [R] int64 token ids.
    """
    r, v = logits.shape
    logits = logits.float()
    is_greedy = temperature.view(r, 1) == 0
    scaled = logits / torch.where(is_greedy, 1.0, temperature.view(r, 1).to(torch.float32))
    keep = filter_mask(scaled, top_k, top_p, min_p)
    race = torch.where(keep, scaled + counter_gumbel(seeds, steps, v), float("-inf"))
    m = scaled.amax(dim=-1)
    bad = torch.isnan(scaled).any(dim=-1) | torch.isinf(m)
    sampled = torch.where(bad, v - 1, greedy(race))
    return torch.where(is_greedy.view(r), greedy(logits), sampled)


def compute_logprobs(logits: Tensor, token_ids: Tensor, top_n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probabilities under the raw model distribution (no temperature, no filters).

    Args:
        logits: [R, V] float raw logits.
        token_ids: [R] int, the tokens whose logprob is wanted (usually the sampled ones).
        top_n: how many of the most likely tokens to return per row (0 = none).
    Returns:
        token_logprob [R] fp32, top_ids [R, top_n] int64, top_logprobs [R, top_n] fp32 (descending).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_logprob = logp.gather(1, token_ids.view(-1, 1).to(torch.int64)).view(-1)
    if top_n <= 0:
        r = logits.shape[0]
        return (token_logprob, torch.empty((r, 0), dtype=torch.int64, device=logits.device),
                torch.empty((r, 0), dtype=torch.float32, device=logits.device))
    top_logprobs, top_ids = torch.topk(logp, min(top_n, logp.shape[-1]), dim=-1)
    return token_logprob, top_ids, top_logprobs


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (one per seeded request)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
