"""The ``dsv4`` command line.

``dsv4 generate [PROMPT ...]``: offline generation with the :class:`~dsv4.engine.llm.LLM` facade. The
engine flags are generated from :class:`EngineConfig`'s fields; the sampling flags map onto
:class:`SamplingParams`. ``dsv4 serve``: the OpenAI-compatible server (:mod:`dsv4.server`). ``dsv4 bench``
and ``dsv4 bench serving``: benchmarks (:mod:`dsv4.bench`). Stdout gets only the results (text, or one JSON line per prompt with
``--json``); progress and errors go to stderr. User errors (bad flags, bad sampling values, a missing
model directory, an invalid config.json) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
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
    _add_serve(sub)
    _add_bench(sub)
    return parser


def _add_serve(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                         description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and "
                                     "/metrics. Binds 127.0.0.1 unless --host says otherwise.")
    h = srv.add_argument_group("server options")
    h.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 = every interface "
                   "(default: %(default)s)")
    h.add_argument("--port", type=int, default=30000, help="TCP port (default: %(default)s)")
    h.add_argument("--api-key", default=None, metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1 routes (default: no key)")
    h.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="info logs one line per request (default: %(default)s)")
    add_cli_args(srv, EngineConfig, title="engine options")
    srv.set_defaults(func=cmd_serve)


def _workload_args(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload options")
    w.add_argument("--num-prompts", type=int, default=64, metavar="N", help="requests to send (default: %(default)s)")
    w.add_argument("--input-len", type=int, default=256, metavar="N",
                   help="longest prompt in tokens (default: %(default)s)")
    w.add_argument("--output-len", type=int, default=64, metavar="N",
                   help="longest output in tokens (default: %(default)s)")
    w.add_argument("--range-ratio", type=float, default=0.5, metavar="R",
                   help="lengths are uniform in [R x len, len]; 1 = fixed (default: %(default)s)")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="throughput/latency benchmarks",
                           description="Offline engine throughput (no HTTP). `dsv4 bench serving --help` "
                                       "measures a running OpenAI-compatible server instead.")
    _workload_args(bench)
    # --seed (EngineConfig) also seeds the workload's lengths and prompt tokens
    add_cli_args(bench, EngineConfig, title="engine options")
    bench.set_defaults(func=cmd_bench)
    modes = bench.add_subparsers(dest="bench_mode", metavar="MODE", parser_class=_Parser)
    srv = modes.add_parser("serving", help="benchmark a running server over streaming HTTP",
                           description="TTFT/ITL/TPOT p50/p99, requests/s and tokens/s of any OpenAI-compatible "
                                       "server (dsv4, SGLang, vLLM), via streaming /v1/completions.")
    srv.add_argument("--base-url", required=True, metavar="URL", help="e.g. http://127.0.0.1:30000")
    srv.add_argument("--model", default=None, metavar="NAME", help="served model name (default: the first in "
                     "/v1/models)")
    srv.add_argument("--concurrency", "--max-concurrency", type=int, default=16, metavar="C",
                     help="most requests in flight (default: %(default)s)")
    srv.add_argument("--api-key", default=None, metavar="KEY", help="sent as `Authorization: Bearer KEY`")
    srv.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                     help="ask the server to run each output to its length (vLLM/SGLang extension)")
    srv.add_argument("--seed", type=int, default=0, help="seeds lengths and prompts (default: %(default)s)")
    _workload_args(srv)
    srv.set_defaults(func=cmd_bench_serving)


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
    _sampling_params(args, len(prompts))  # before loading: bad values fail fast
    config = from_cli(args)
    if config.model is not None and not Path(config.model).is_dir():
        raise UsageError(f"--model {config.model}: no such directory")
    return _run(_generate, args, config)


def _generate(args: argparse.Namespace, config: EngineConfig) -> int:
    prompts: list[str | list[int]] = (
        [parse_token_ids(p) for p in args.prompts] if args.token_ids else list(args.prompts))
    params = _sampling_params(args, len(prompts))
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


def cmd_serve(args: argparse.Namespace) -> int:
    config = from_cli(args)
    if config.model is not None and not Path(config.model).is_dir():
        raise UsageError(f"--model {config.model}: no such directory")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    try:
        from dsv4.server.launch import serve  # noqa: F401
    except ImportError as e:
        raise UsageError(f"the server could not be imported ({e}); install dsv4 with its dependencies") from None
    return _run(_serve, args, config)


def _serve(args: argparse.Namespace, config: EngineConfig) -> int:
    from dsv4.server.launch import serve

    serve(config, args.host, args.port, api_key=args.api_key, log_level=args.log_level)
    return 0


def _run(command: Callable[[argparse.Namespace, EngineConfig], int], args: argparse.Namespace,
         config: EngineConfig) -> int:
    """Run ``command`` here, or with --tp-size/--ep-size > 1 as rank 0 of ranks this launches
    (dsv4/distributed/launch.py): one process per rank, user errors still reported in one line."""
    if config.world_size == 1:
        return command(args, config)
    from dsv4.distributed.launch import RankFailedError, launch

    try:
        return launch(functools.partial(_rank0, command), args, config)
    except RankFailedError as e:
        print(f"dsv4 {args.command}: error: {e}", file=sys.stderr)
        return 1


def _rank0(command: Callable[[argparse.Namespace, EngineConfig], int], args: argparse.Namespace,
           config: EngineConfig) -> int:
    """``command`` on rank 0, with :func:`main`'s reporting of user errors (the launcher passes the status on)."""
    try:
        return command(args, config)
    except (UsageError, ValueError, OSError) as e:
        print(f"dsv4 {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def cmd_bench(args: argparse.Namespace) -> int:
    from dsv4.bench.offline import OfflineWorkload, run_offline

    w = OfflineWorkload(args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.seed)
    config = from_cli(args)
    if config.model is not None and not Path(config.model).is_dir():
        raise UsageError(f"--model {config.model}: no such directory")
    run_offline(config, w, progress=sys.stderr.isatty())
    return 0


def cmd_bench_serving(args: argparse.Namespace) -> int:
    import httpx

    from dsv4.bench.serving import ServingWorkload, run_serving

    w = ServingWorkload(args.base_url, args.model, args.num_prompts, args.concurrency, args.input_len,
                        args.output_len, args.range_ratio, args.seed, args.api_key, args.ignore_eos)
    try:
        run_serving(w)
    except httpx.HTTPError as e:
        raise UsageError(f"cannot talk to {args.base_url}: {type(e).__name__}: {e}") from None
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
