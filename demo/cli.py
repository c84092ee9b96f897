"""``fss-demo``: serve the paint-and-segment page on loopback, the bundled model by default."""

import argparse
import os
import sys
from pathlib import Path

from fss.cli_args import (
    add_batch_arg,
    add_edges_arg,
    add_memory_arg,
    add_min_score_arg,
    add_model_args,
    demo_model_note,
    load_from_args,
    port,
)
from fss.constants import REFINEMENTS
from fss.errors import FssError

PROG = "fss-demo"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"  # the repository's examples, when run from it
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog=PROG,
        description="A web page to paint support masks and see query images segmented (Gradio).",
    )
    add_model_args(p)
    # fss-run's --refine (fss.cli_args.add_refine_arg), its help without the methods' defaults, whose
    # registry imports torch: fss-demo --help stays light.
    p.add_argument(
        "--refine",
        choices=REFINEMENTS,
        default=None,
        help="test-time refinement, as fss-run --refine (default: the checkpoint's method's)",
    )
    add_min_score_arg(p)
    add_edges_arg(p)
    p.add_argument(
        "--server",
        metavar="URL",
        help="segment on a running fss-serve (host:port or grpc://host:port) instead of a local model",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=port, default=7860, help="port (default 7860)")
    add_batch_arg(p)
    add_memory_arg(
        p,
        "--feature-budget-mb",
        512,
        "query features kept per tab, so that a shot change does not re-encode them (default 512)",
    )
    p.add_argument("--examples", type=Path, default=EXAMPLES, help="folder with support/ and query/ examples")
    args = p.parse_args(argv)
    if args.bundle is None and args.backend not in ("auto", "torch"):
        p.error(f"--backend {args.backend} runs an exported bundle: give --bundle DIR (see fss-export)")
    if args.server is not None:
        local = {"--ckpt": args.ckpt, "--bundle": args.bundle, "--refine": args.refine}
        local.update({"--min-score": args.min_score, "--edges": args.edges})
        for flag, value in local.items():
            if value is not None:
                p.error(f"{flag} is for a local model: with --server, the server's model and refinement run")
    return args


def load_engine(args):
    """The model of ``--ckpt`` / ``--bundle`` (or the bundled one) in an Engine, or the client of
    ``--server``; errors are FssError."""
    if args.server is not None:
        from fss.demo.remote import RemoteEngine

        return RemoteEngine(args.server, batch=args.batch, feature_budget_mb=args.feature_budget_mb)
    from fss.demo.session import Engine

    model, device = load_from_args(args, demo_model_note(PROG))
    name = str(args.bundle or args.ckpt or "bundled demo model")
    return Engine(
        model,
        name,
        device=device,
        batch=args.batch,
        feature_budget_mb=args.feature_budget_mb,
        refine=args.refine,
        min_score=args.min_score,
        edges=args.edges,
    )


def serve(args, block: bool = True):
    """Build the page and start the server; returns the Gradio app (``block=False`` for tests)."""
    engine = load_engine(args)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the page works offline
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise FssError("the demo needs Gradio: pip install 'fss[demo]'") from None
    from fss.demo.app import build_app

    app = build_app(engine, args.examples if args.examples and args.examples.is_dir() else None)
    if args.host not in LOOPBACK:
        print(f"{PROG}: warning: serving on {args.host}: anyone who can reach it can use it", file=sys.stderr)
    try:
        app.launch(
            server_name=args.host,
            server_port=args.port,
            prevent_thread_lock=not block,
            ssr_mode=False,
            max_file_size="64mb",
            quiet=not block,
        )
    except OSError:
        raise FssError(f"cannot serve on {args.host}:{args.port}: is the port in use? (--port)") from None
    return app


def main(argv=None) -> int:
    from fss.command import run_command

    args = parse_args(argv)
    return run_command(PROG, lambda: serve_until_stopped(args))


def serve_until_stopped(args) -> int:
    serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
