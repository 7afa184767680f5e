"""The ``dsv4`` command line.

``dsv4 generate [PROMPT ...]``: offline generation with the :class:`~dsv4.engine.llm.LLM` facade. The
engine flags are generated from :class:`EngineConfig`'s fields; the sampling flags map onto
:class:`SamplingParams`. Stdout gets only the results (text, or one JSON line per prompt with
``--json``); progress and errors go to stderr. User errors (bad flags, bad sampling values, a missing
model directory, an invalid config.json) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from dsv4.engine.engine_config import EngineConfig, add_cli_args, from_cli
from dsv4.engine.sampling_params import MAX_LOGPROBS, SamplingParams

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in what the user asked for: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (usage stays available through --help)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsv4", description="Inference engine for DeepSeek-V4.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate text for prompts (offline)",
                         description="Generate a completion for each PROMPT and print it to stdout.")
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text (or token ids with --token-ids)")
    d = SamplingParams()
    s = gen.add_argument_group("sampling options")
    s.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, default=d.max_new_tokens,
                   metavar="N", help="most tokens to generate per prompt (default: %(default)s)")
    s.add_argument("--temperature", type=float, default=d.temperature, metavar="T",
                   help="softmax temperature; 0 = greedy (default: %(default)s)")
    s.add_argument("--top-p", type=float, default=d.top_p, metavar="P",
                   help="nucleus sampling mass in (0, 1] (default: %(default)s)")
    s.add_argument("--top-k", type=int, default=d.top_k, metavar="K",
                   help="sample among the K most likely tokens; -1 or 0 = off (default: %(default)s)")
    s.add_argument("--min-p", type=float, default=d.min_p, metavar="P",
                   help="drop tokens less likely than P times the most likely one (default: %(default)s)")
    s.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    s.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the output contains TEXT (repeatable)")
    s.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help=f"report each token's logprob and the top N alternatives (0..{MAX_LOGPROBS})")
    o = gen.add_argument_group("input/output options")
    o.add_argument("--token-ids", action="store_true",
                   help="each PROMPT is comma-separated token ids (e.g. 0,72,105) instead of text")
    o.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt (ids, text, finish_reason, logprobs)")
    # --seed comes from EngineConfig: it seeds the engine, and prompt i samples with seed + i.
    add_cli_args(gen, EngineConfig, title="engine options")
    gen.set_defaults(func=cmd_generate)
    return parser


def parse_token_ids(text: str) -> list[int]:
    """"0, 72,105" -> [0, 72, 105]; raises UsageError naming the bad item."""
    ids: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit():
            raise UsageError(f"--token-ids: {item!r} in {text!r} is not a non-negative integer")
        ids.append(int(item))
    return ids


def _sampling_params(args: argparse.Namespace, n_prompts: int) -> list[SamplingParams]:
    # Different seeds per prompt: identical prompts give different samples, and each prompt's output
    # is reproducible on its own, whatever else is in the batch.
    return [
        SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, min_p=args.min_p, seed=args.seed + i, stop=list(args.stop),
            ignore_eos=args.ignore_eos, logprobs=args.logprobs,
        )
        for i in range(n_prompts)
    ]


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.prompts:
        raise UsageError("generate: no PROMPT given")
    prompts: list[str | list[int]] = (
        [parse_token_ids(p) for p in args.prompts] if args.token_ids else list(args.prompts))
    params = _sampling_params(args, len(prompts))  # before loading: bad values fail fast
    config = from_cli(args)
    if config.model is not None and not Path(config.model).is_dir():
        raise UsageError(f"--model {config.model}: no such directory")
    try:
        from dsv4.engine.llm import LLM
        from dsv4.weights import WeightLoadError
    except ImportError as e:
        raise UsageError(f"the engine could not be imported: {e}") from None

    t0 = time.perf_counter()
    what = config.model or "the embedded tiny model"
    print(f"dsv4: loading {what} (device {config.device}, dtype {config.dtype}) ...", file=sys.stderr, flush=True)
    try:
        llm = LLM(config, progress=sys.stderr.isatty())
    except WeightLoadError as e:  # missing, truncated or mismatched weight files: the user's to fix
        raise UsageError(f"cannot load the weights of {what}: {e}") from None
    print(f"dsv4: loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    outputs = llm.generate(prompts, params, progress=sys.stderr.isatty())
    for out in outputs:
        if args.json:
            print(json.dumps(out.to_json_dict(), ensure_ascii=False), flush=True)
        else:
            print(out.text, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dsv4`` and ``python -m dsv4``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    # NOTE: ValueError covers SamplingParams, EngineConfig and ModelConfig (ConfigError) validation;
    # OSError covers missing or unreadable model files. Anything else is a bug and keeps its traceback.
    except (UsageError, ValueError, OSError) as e:
        print(f"dsv4 {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dsv4: interrupted", file=sys.stderr)
        return 130
