"""``draftstream produce``: run the target over prepared rows and send or spill the hidden states.

The command line over two runs: ``--spill DIR`` writes ``hs_{i}.safetensors`` files
(``producer.spill_run``), ``--connect ENDPOINT...`` streams samples to the trainer ranks that grant
the rows (``producer.stream_run``). Flags are checked by ``producer.run_config.ProduceConfig``.
SIGINT/SIGTERM stop either run after the current batch (``protocol.signals.StopSignals``); a spill
run stopped early resumes when the same command runs again. A streaming run that a stop cannot
reach where it blocks (loading the target, a send to a trainer that is gone) exits
``STOP_DEADLINE_S`` after the signal, with 128 + its number: it holds nothing a trainer cannot get
again from another producer. (A spill run always finishes its batch and writes its report.)
"""

from __future__ import annotations

import argparse
import sys

from producer.backend import DTYPE_CHOICES
from producer.run_config import BACKENDS, ProduceConfig
from producer.spill_run import produce
from producer.stream_run import stream
from protocol.cli import DefaultsHelpFormatter, config_defaults
from protocol.logs import setup_logging
from protocol.signals import StopSignals

STOP_DEADLINE_S = 10.0  # a stop that has not ended the run by then ends the process


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="draftstream produce",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="target model: local folder or hub id")
    parser.add_argument("--data", required=True, help="prepared dataset folder (draftstream prepare --output)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--spill", help="offline: folder for hs_{i}.safetensors files")
    mode.add_argument(
        "--connect",
        nargs="+",
        help="streaming: one address per trainer, rank 0's stream endpoint: ipc://DIR or tcp://HOST:PORT (as "
        "its --stream-endpoint); the trainer's other ranks, on any host, are found there",
    )
    parser.add_argument(
        "--num-ranks", type=int, help="streaming: check that each trainer has this many ranks (default: as it says)"
    )
    parser.add_argument(
        "--share-window-bytes",
        type=int,
        help="streaming to several trainers (--connect A B): captures kept for the trainers that have not had them "
        "yet, so a row they all train on runs the target once; 0 turns sharing off",
    )
    parser.add_argument("--producer-id", help="streaming: a unique name (default: host and pid)")
    parser.add_argument("--handshake-timeout", type=float, help="streaming: seconds to wait for a trainer")
    parser.add_argument("--curve-secret-key", help="streaming: this producer's CURVE secret key file")
    parser.add_argument("--curve-server-key", help="streaming: the trainer's CURVE public key file")
    parser.add_argument("--max-samples", type=int, help="only the first N rows of the dataset")
    parser.add_argument("--backend", choices=BACKENDS, help="capture backend: hf (transformers, default) or vllm")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, help="target dtype (auto: the checkpoint's)")
    parser.add_argument("--device", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--target-layer-ids", type=int, nargs="+", help="layer ids to capture (default: 2 N//2 N-3 N)")
    parser.add_argument("--max-batch-tokens", type=int, help="padded tokens per forward")
    parser.add_argument("--validate", action="store_true", help="re-read and check every file of this rank at the end")
    parser.add_argument("--world-size", type=int, help="number of producer processes sharing the rows")
    parser.add_argument("--rank", type=int, help="this producer's rank: takes rows with i %% world-size == rank")
    parser.add_argument(
        "--skip-nonfinite", action="store_true", help="skip and count rows with NaN/Inf instead of failing"
    )
    vllm = parser.add_argument_group("--backend vllm")
    vllm.add_argument(
        "--endpoint",
        help="a running `draftstream launch-vllm` server, http://HOST:PORT (default: an in-process engine)",
    )
    vllm.add_argument("--served-model-name", help="the server's model name (default: the first it lists)")
    vllm.add_argument("--concurrency", type=int, help="requests in flight against --endpoint")
    vllm.add_argument(
        "--report-endpoint",
        help="where vLLM's connector reports deliveries (default: ipc:// in a temp folder; tcp://THIS_HOST:PORT when vLLM runs elsewhere)",
    )
    vllm.add_argument(
        "--report-timeout",
        type=float,
        help="spill: seconds to wait for the last files to be reported written",
    )
    vllm.add_argument(
        "--vllm-engine-args",
        help="in-process engine: JSON of more vllm.LLM arguments, e.g. '{\"gpu_memory_utilization\": 0.8}'",
    )
    # Every knob's default is ProduceConfig's: one default, shown by --help.
    parser.set_defaults(**config_defaults(ProduceConfig))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.producer_id or f"producer-{args.rank}")
    deadline = STOP_DEADLINE_S if args.connect else None
    with StopSignals("stopping after this batch", deadline_s=deadline) as signals:
        try:
            config = ProduceConfig(**vars(args))
            if config.connect:
                return stream(config, stop=signals.event)
            report = produce(config, stop=signals.event)
        except (ValueError, TimeoutError, ConnectionError) as e:
            print(f"draftstream produce: error: {e}", file=sys.stderr)
            return 1
    print(report.format())
    failed = report.validation is not None and not report.validation.passed
    return 1 if failed or report.stopped_early else 0


if __name__ == "__main__":
    raise SystemExit(main())
