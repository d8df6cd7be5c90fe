#!/usr/bin/env python
"""An OpenAI-compatible HTTP server over every budget of an elastic checkpoint, from one copy of
the weights (cached decoding; requests of one budget batched).

    python tools/serve.py --checkpoint runs/quickstart/stage2/step_0000040 --port 8000
    curl http://127.0.0.1:8000/v1/models
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "elastic@50%", "prompt": "What is 3 + 4?", "temperature": 0}'

Models are ``elastic@<budget>`` for every trained budget, and ``elastic@<fraction>`` for each
``--interpolate`` fraction (router interpolation: untrained). Endpoints: ``/v1/models``,
``/v1/completions``, ``/v1/chat/completions`` (the tokenizer's chat template), ``/health``
(:mod:`megatron_elastic.serving.api`). SIGTERM or Ctrl-C finishes the requests in flight and
exits 0. Bad input (unknown checkpoint, a fraction outside the trained range, ...) stops with
one line and exit code 2.
"""

from __future__ import annotations

import sys

from megatron_elastic import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    from megatron_elastic.serving.api import serve

    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="elastic (or exported) checkpoint")
    parser.add_argument("--host", help="address to listen on")
    parser.add_argument("--port", type=int, help="port to listen on")
    parser.add_argument(
        "--interpolate",
        type=float,
        nargs="+",
        help="also serve these fractions between trained budgets (router interpolation)",
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer file or directory (default: the checkpoint's)"
    )
    parser.add_argument(
        "--batch-window", type=float, help="seconds to gather requests of one budget into a batch"
    )
    parser.add_argument("--max-batch", type=int, help="prompts per batch at most")
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        help="seconds to finish in-flight requests on SIGTERM before cancelling them",
    )
    parser.take_defaults(serve)
    args = parser.parse_args(argv)
    serve(**cli.options(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
