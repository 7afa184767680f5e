"""Per-request sampling parameters.

One frozen :class:`SamplingParams` per request. It is checked once when it is built, so the scheduler
and the sampler can trust every field (the sampler never validates on the hot path).

Conventions (vLLM/SGLang habits):

* ``temperature == 0`` means greedy decoding (argmax, ties to the lowest token id);
* ``top_k`` of ``-1`` or ``0`` turns top-k off; ``top_p == 1`` and ``min_p == 0`` turn those off;
* ``seed`` gives the request its own random stream, so its samples do not depend on which other
  requests share the batch; ``None`` seeds it from the engine's seed and the request id;
* ``logprobs``: ``None`` returns none, ``0`` only the sampled token's logprob, ``n`` also the top ``n``;
* ``skip_special_tokens``: drop special tokens from the output text (chat parsers turn it off to see
  ``</think>`` and the DSML tool-call markers).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import InitVar, dataclass, field, fields

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # OpenAI/vLLM spelling of max_new_tokens; wins when given.
    max_tokens: InitVar[int | None] = None

    def __post_init__(self, max_tokens: int | None) -> None:
        # NOTE: the dataclass is frozen, so normalisation goes through object.__setattr__.
        if max_tokens is not None:
            object.__setattr__(self, "max_new_tokens", max_tokens)
        # OpenAI lets `stop` be one string; keep our own copies so callers cannot mutate them later.
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", list(self.stop_token_ids))
        self.validate()

    # ---- queries -------------------------------------------------------------------------------------
    @property
    def greedy(self) -> bool:
        """True when this request decodes by argmax (temperature 0)."""
        return self.temperature == 0

    @property
    def top_k_or_off(self) -> int:
        """top_k with "off" spelled as 0 (what the sampler's int tensor holds)."""
        return self.top_k if self.top_k > 0 else 0

    def replace(self, **changes: object) -> SamplingParams:
        """A validated copy with some fields changed (``max_tokens`` accepted as an alias)."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw.update(changes)
        return SamplingParams(**kw)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> SamplingParams:
        """Build from a plain dict (a JSON request body); unknown keys are an error naming the key."""
        known = {f.name for f in fields(cls)} | {"max_tokens"}
        for k in d:
            if k not in known:
                raise ValueError(f"SamplingParams: unknown field `{k}`")
        return cls(**d)  # type: ignore[arg-type]

    # ---- validation ----------------------------------------------------------------------------------
    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ``ValueError`` naming the first bad field. ``vocab_size`` also checks stop_token_ids."""

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be an integer >= 1")
        if not _is_real(self.temperature) or not self.temperature >= 0 or self.temperature == float("inf"):
            raise bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "must be an integer >= -1 (-1 or 0 = off)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", "must be None or an integer in [0, 2**63)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be a list of non-empty strings")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative integers")
        if vocab_size is not None and any(t >= vocab_size for t in self.stop_token_ids):
            raise bad("stop_token_ids", f"must be < vocab_size ({vocab_size})")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be a bool")
        if not isinstance(self.skip_special_tokens, bool):
            raise bad("skip_special_tokens", "must be a bool")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"must be None or an integer in [0, {MAX_LOGPROBS}]")


def _is_int(v: object) -> bool:
    # bool is an int subclass; `top_k=True` is a bug, not a 1.
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def stop_ids_for(params: SamplingParams, eos_ids: Iterable[int]) -> frozenset[int]:
    """Token ids that end this request: its stop_token_ids, plus EOS unless ignore_eos."""
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        ids.update(eos_ids)
    return frozenset(ids)
