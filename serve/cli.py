"""``fss-serve``: the few-shot segmenter behind Triton Inference Server (HTTP + gRPC, KServe v2)."""

import argparse
import socket
import sys
from dataclasses import fields
from pathlib import Path

from fss.cli_args import add_model_args, add_size_arg, check_input_size, count, port, positive_int, share
from fss.errors import FssError

PROG = "fss-serve"
DEMO_NOTICE = f"{PROG}: no --ckpt / --bundle given: serving the bundled demo model (see README, 'Demo model')"


def add_limit_args(p: argparse.ArgumentParser) -> None:
    """The request limits (:class:`fss.serve.handlers.Limits`), checked before decoding."""
    from fss.serve.handlers import Limits

    defaults = Limits()
    for field, what in (
        ("max_image_bytes", "per encoded image"),
        ("max_pixels", "per image, from its header"),
        ("max_shots", "shots per support set"),
    ):
        flag = "--" + field.replace("_", "-")
        p.add_argument(flag, type=positive_int, default=getattr(defaults, field), metavar="N", help=what)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Serve few-shot segmentation on Triton Inference Server: register a support set once "
        "(model fss_support), segment query images against it (model fss_segment, dynamically batched).",
    )
    source = add_model_args(p, backends=("auto", "onnxruntime", "tensorrt"), backend_help="for --bundle")
    source.add_argument(
        "--repository", type=Path, metavar="DIR", help="serve a model repository (fss-export --triton-repo)"
    )
    add_size_arg(p, "the model's")
    p.add_argument(
        "--address", default="127.0.0.1", metavar="IP", help="address to bind (default loopback only)"
    )
    p.add_argument("--http-port", type=port, default=8000, metavar="P", help="HTTP (KServe v2 REST) port")
    p.add_argument("--grpc-port", type=port, default=8001, metavar="P", help="gRPC (KServe v2) port")
    p.add_argument("--metrics-port", type=port, default=8002, metavar="P", help="Prometheus metrics port")
    p.add_argument(
        "--instances", type=positive_int, default=1, metavar="N", help="fss_segment model instances"
    )
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=8,
        metavar="B",
        help="largest batch the dynamic batcher forms",
    )
    p.add_argument(
        "--max-queue-delay-us",
        type=count,
        default=2000,
        metavar="T",
        help="how long a request may wait for batchmates",
    )
    p.add_argument(
        "--max-supports", type=positive_int, default=64, metavar="N", help="support sets cached (LRU)"
    )
    p.add_argument(
        "--support-root",
        type=Path,
        metavar="DIR",
        help="allow registering server-side support folders below this folder",
    )
    add_limit_args(p)
    p.add_argument(
        "--min-score",
        type=share,
        default=None,
        metavar="S",
        help="presence cut-off from 0 to 1: a class scoring below it gets no pixels (default: checkpoint's)",
    )
    p.add_argument(
        "--exit-timeout",
        type=int,
        default=30,
        metavar="S",
        help="seconds in-flight requests get to finish on shutdown",
    )
    p.add_argument(
        "--triton-log", type=Path, metavar="FILE", help="write the Triton server's log here (default: stdout)"
    )
    args = p.parse_args(argv)
    check_input_size(p, args.size)
    if len({args.http_port, args.grpc_port, args.metrics_port}) != 3:
        p.error("--http-port, --grpc-port and --metrics-port must differ")
    return args


def check_port_free(address: str, number: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as sock:
        try:
            sock.bind((address, number))
        except OSError as err:
            raise FssError(f"cannot listen on {address}:{number}: {err.strerror}") from None


def config_from_args(args):
    from fss.serve.handlers import Limits
    from fss.serve.server import ServeConfig

    if args.support_root is not None and not args.support_root.is_dir():
        raise FssError("--support-root is not a folder", args.support_root)
    if args.repository is not None and not (args.repository / "fss-repo.json").is_file():
        raise FssError("not a model repository written by fss-export --triton-repo", args.repository)
    if args.ckpt is not None and not args.ckpt.is_file():
        raise FssError("checkpoint not found", args.ckpt)
    for number in (args.http_port, args.grpc_port, args.metrics_port):
        check_port_free(args.address, number)
    same_names = {f.name: getattr(args, f.name) for f in fields(ServeConfig) if hasattr(args, f.name)}
    return ServeConfig(
        **same_names,
        exit_timeout_s=args.exit_timeout,
        limits=Limits(args.max_image_bytes, args.max_pixels, args.max_shots),
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = config_from_args(args)
        if args.ckpt is None and args.bundle is None and args.repository is None:
            print(DEMO_NOTICE, file=sys.stderr)
        if args.address not in ("127.0.0.1", "localhost", "::1"):
            print(f"{PROG}: warning: listening on {args.address}, not only on loopback", file=sys.stderr)
        from fss.serve.server import serve

        serve(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    except FssError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    print(f"{PROG}: stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
