"""Token sampling: the plain PyTorch reference, vectorised over requests.

``sample`` turns one row of logits per request into one token id per request:

1. rows with temperature 0 take the greedy argmax (ties to the lowest id);
2. other rows are scaled by ``1/T``, then filtered in this order (as HF, vLLM and SGLang do):
   top-k (keep the ``k`` largest), top-p (on the top-k-renormalised distribution, keep the smallest
   prefix of the sorted tokens whose mass is >= ``top_p``; the top token always stays), min-p (drop
   tokens with ``p < min_p * p_max``; the ratio does not change under renormalisation, so min-p
   commutes with the other two);
3. a token is drawn by an exponential race: ``argmax(log p - log E)`` with ``E ~ Exp(1)`` per token,
   which draws from ``p`` exactly. Each row's noise comes from that row's own ``torch.Generator``, so a
   seeded request draws the same tokens whatever else is in the batch and in whichever row it sits.

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

    # top-p on the distribution renormalised over the top-k survivors.
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # exclusive prefix sum
    # NOTE: `mass_before < top_p` keeps rank 0 (mass 0 < top_p since top_p > 0) and stops at the first
    # rank where the mass already reached top_p: the smallest set whose mass is >= top_p.
    keep &= mass_before < top_p.view(r, 1).to(probs.dtype)
    # top_p == 1 must keep every top-k survivor even if the fp32 cumsum rounds to 1 early.
    keep |= (top_p.view(r, 1) >= 1) & (rank < k)

    # min-p against the most likely token (sorted position 0).
    keep &= probs >= min_p.view(r, 1).to(probs.dtype) * probs[:, :1]
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
