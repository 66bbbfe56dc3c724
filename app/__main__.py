"""`python -m app <command>`: a table of subcommands; each parses → validates → calls one SDK function → prints.

A user mistake ends with one line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from app.errors import UserError


def _add_preset(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--preset", default=default, help=f"preset name or YAML path (default: {default})")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)",
    )


# ---- prepare-data --------------------------------------------------------------------------------------------


def _prepare_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source", dest="sources", action="append", metavar="SOURCE",
        help="stdlib, pydoc, a file/folder (.txt/.jsonl/.parquet), or a URI; prefix DOMAIN= to label it "
        "(repeatable; default: the preset's data.sources)",
    )
    p.add_argument("--out", help="output folder (default: the preset's data.dir)")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default: the preset's model.vocab_size)")
    p.add_argument("--max-documents", type=int, help="keep at most N documents per source")
    p.add_argument("--force", action="store_true", help="replace whatever is in --out")
    p.add_argument("--num-cpus", type=int, help="CPUs for embedded Ray (default: all)")
    _add_preset(p, "base")


def _prepare_data(args: argparse.Namespace) -> int:
    from app import sdk
    from app.console import print_table

    result = sdk.prepare_data(
        args.sources, args.out, preset=args.preset, overrides=args.overrides, vocab_size=args.vocab_size,
        max_documents=args.max_documents, force=args.force, num_cpus=args.num_cpus,
    )
    m = result.manifest
    verb = "reused (identical settings)" if result.reused else f"prepared in {result.seconds:.1f} s"
    print_table(f"{m.directory}: {verb}", ["split", "domain", "documents", "tokens"], result.rows())
    print(f"{m.tokens('train') + m.tokens('val'):,} tokens (train {m.tokens('train'):,}, val {m.tokens('val'):,}); "
          f"vocab {m.vocab_size}; manifest {m.path}")
    return 0


# ---- info ----------------------------------------------------------------------------------------------------


def _info_args(p: argparse.ArgumentParser) -> None:
    _add_preset(p, "base")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _info(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from app import sdk
    from app.console import print_table

    result = sdk.info(args.preset, args.overrides)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        rows = result.rows()
        rows = [(k, f"{v / 2**20:,.1f} MiB" if k.endswith("_bytes") else v) for k, v in rows]
        print_table(f"model info: preset {args.preset}", ["field", "value"], rows)
    return 0


# ---- train ---------------------------------------------------------------------------------------------------


def _train_args(p: argparse.ArgumentParser) -> None:
    _add_preset(p, "tiny")
    p.add_argument("--workers", help="N, or MIN:MAX for an elastic group (parallel.workers)")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage (parallel.zero_stage)")
    p.add_argument("--pipeline-stages", type=int, help="pipeline-parallel stages (parallel.pipeline_stages)")
    p.add_argument("--offload", action="store_true", help="offload optimizer state to CPU (parallel.offload_optimizer)")
    p.add_argument("--steps", type=int, help="optimizer steps (steps)")
    p.add_argument("--run-name", help="run name; re-running a name resumes it (name)")
    p.add_argument("--storage", help="folder or pyarrow URI for runs (storage)")
    p.add_argument("--num-cpus", type=int, help="CPUs for embedded Ray (default: what the workers need)")


def _train_overrides(args: argparse.Namespace) -> list[str]:
    flags = {"parallel.workers": args.workers, "parallel.zero_stage": args.zero,
             "parallel.pipeline_stages": args.pipeline_stages, "steps": args.steps, "name": args.run_name,
             "storage": args.storage, "parallel.offload_optimizer": True if args.offload else None}
    return [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides


def _train(args: argparse.Namespace) -> int:
    from app import sdk
    from app.console import print_table

    result = sdk.train(args.preset, _train_overrides(args), num_cpus=args.num_cpus)
    s = result.summary
    rows = [(k, s[k]) for k in ("final_loss", "final_val_loss", "steps", "tokens", "tokens_per_s", "mfu",
                                 "straggler_ratio_p50", "goodput", "wall_s", "world_sizes", "restarts")]
    print_table(f"run {s['run']}", ["metric", "value"], rows)
    print(f"run folder {result.run_dir} (summary.json, history.csv); artifact {result.artifact}")
    return 0


# ---- the table -----------------------------------------------------------------------------------------------

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "prepare-data": ("tokenise a corpus into Parquet token shards with a manifest", _prepare_data_args, _prepare_data),
    "info": ("parameters, FLOPs per token and memory per worker of a preset", _info_args, _info),
    "train": ("train with Ray Train + DeepSpeed (ZeRO 0-3, offload, pipeline); resumes a run by name",
              _train_args, _train),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (exit 2) instead of the usage block."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m app", description="scalestack: train, sweep and serve GPTs on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
