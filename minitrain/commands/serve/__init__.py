"""``minitrain serve``: a trained run, or a file ``minitrain export`` wrote, as an HTTP service.

FastAPI on uvicorn (the ``serve`` extra), one process: requests are decoded in threads, their
images queued, and concurrent requests batched into one model call (:mod:`.batcher`). This
module only declares the command; the serving libraries are imported when it runs, so that
``minitrain --help`` stays quick and ``pip install minitrain`` needs none of them.
"""

from __future__ import annotations

import argparse
import os

API_KEY_ENV = "MINITRAIN_API_KEY"


def add_parser(command) -> None:
    """Register ``minitrain serve``."""
    parser = command(
        "serve",
        help="serve a run or an exported model over HTTP: POST /predict, a page at /, /metrics (serve extra)",
    )
    parser.add_argument(
        "source",
        metavar="RUN_DIR|EXPORTED_FILE",
        help="a run directory (its last checkpoint, run by PyTorch), or a file `minitrain export` wrote "
        "(.onnx is run by ONNX Runtime)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
    parser.add_argument(
        "--max-batch", type=int, default=32, metavar="B", help="most images in one model call (default 32)"
    )
    parser.add_argument(
        "--batch-timeout",
        type=float,
        default=0.0,
        metavar="MS",
        help="how long the first image of a batch waits for others, in milliseconds (default 0: a batch "
        "is what queued while the model was busy; "
        "0 with --max-batch 1 turns batching off)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, metavar="N", help="batches the model may run at once (default 1)"
    )
    parser.add_argument(
        "--max-images", type=int, default=32, metavar="N", help="most images in one request (default 32)"
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get(API_KEY_ENV),
        help=f"require this key (header Authorization: Bearer KEY, or X-API-Key: KEY) on /predict, /metadata "
        f"and /metrics (default: ${API_KEY_ENV}, else none)",
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from minitrain.commands.serve.server import serve

    return serve(args)
