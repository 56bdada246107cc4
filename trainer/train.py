"""``draftstream train``: train an Eagle-3 / P-EAGLE draft from hidden-state files, or from hidden
states that producers stream live (``--stream-endpoint``), in one process or under ``torchrun`` with FSDP2.

Flag names are the speculators trainer's where the meaning is the same, so its tutorial command
lines run with only the program name changed::

    draftstream train --verifier-name-or-path M --data-path ./output \\
        --hidden-states-path ./output/hidden_states --save-path ./output/checkpoints \\
        --draft-vocab-size 32000 --epochs 5 --lr 1e-4 --total-seq-len 8192 --on-missing raise
    torchrun --standalone --nproc_per_node 2 $(which draftstream) train ...same flags...
    torchrun --standalone --nproc_per_node 2 -m trainer.train ...same flags...

``--target-layer-ids`` takes the three auxiliary ids, or four with the last layer id N at the end
(what the producer captured); default ``2 N//2 N-3``. The run resumes on its own from the latest
checkpoint in ``--save-path`` (``--no-resume-from-checkpoint`` to start over); ``--from-pretrained``
starts from a saved draft's weights with a fresh optimizer.

Flags map onto ``LoopConfig`` (``trainer.training.config``) and ``DraftConfig``
(``trainer.models.config``) by name: those dataclasses hold each knob's one default and one
validation (``config_from_args``); a model flag left at ``None`` means "the ``DraftConfig`` default"
and, on resume, "whatever the checkpoint has".

Exit status: 0 when training completed (or ``--max-steps`` or ``--time-budget`` was reached), 2 for
a usage or data error found before training, 128 + signal number (130 SIGINT, 143 SIGTERM) when a
signal stopped the run after writing ``<save-path>/latest/`` (run the same command to continue);
a signal also ends a wait for data that may not come (no producer delivering).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from protocol.cli import DefaultsHelpFormatter, config_defaults
from protocol.codec import DTYPES
from protocol.sockets import CurveKeys
from protocol.target import TargetSpec, aux_layer_ids, checkpoint_dtype, sample_nbytes
from trainer.data.sources import ON_MISSING, VAL_RATIO
from trainer.models.config import ATTENTION_BACKENDS, DRAFT_ARCHS, LOSS_FUNCTIONS, SPECULATOR_TYPES, DraftConfig
from trainer.stream.config import BATCHES_BUFFERED, BUFFER_HEADROOM, StreamConfig, peak_live_bytes
from trainer.stream.source import StreamSampleSource
from trainer.training.config import OPTIMIZERS, PRECISIONS, SCHEDULERS, TRACKERS, LoopConfig

logger = logging.getLogger("trainer.train")

_DRAFT_FIXED = ("speculator_type", "verifier_name_or_path", "aux_layer_ids")  # DraftConfig fields not read from flags
_DRAFT_OVERRIDES = (
    "ttt_step_loss_decay",
    "down_sample_ratio",
    "down_sample_ratio_min",
    "max_anchors",
    "loss_fn",
    "attention_backend",
)


_LOOP, _DRAFT, _STREAM = config_defaults(LoopConfig), config_defaults(DraftConfig), config_defaults(StreamConfig)
LIVE_CHUNKS = 10**9  # a live run's --epochs when none is given: every chunk that comes


def config_kwargs(cls, args: argparse.Namespace, *, given_only: bool = False, skip: tuple[str, ...] = ()) -> dict:
    """The fields of dataclass ``cls`` that ``args`` has a flag for (argparse dest == field name);
    ``given_only``: leave out flags left at ``None`` (= the dataclass default)."""
    values = vars(args)
    names = [f.name for f in dataclasses.fields(cls) if f.name in values and f.name not in skip]
    return {k: values[k] for k in names if not (given_only and values[k] is None)}


def config_from_args(cls, args: argparse.Namespace, **extra):
    """``cls(**flags named like its fields, **extra)``: the dataclass validates."""
    return cls(**{**config_kwargs(cls, args), **extra})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="draftstream train",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--verifier-name-or-path",
        required=True,
        help="target (verifier) model: local directory or hub id (only config, index and head shards are fetched)",
    )
    g.add_argument("--speculator-type", default="eagle3", choices=SPECULATOR_TYPES)
    g.add_argument("--from-pretrained", default="", help="a saved draft to fine-tune (fresh optimizer)")
    g.add_argument("--num-layers", type=int, default=_DRAFT["num_layers"], help="draft decoder layers")
    g.add_argument("--draft-arch", default=None, choices=DRAFT_ARCHS, help="default: the verifier's family")
    g.add_argument("--draft-vocab-size", type=int, default=None, help="default: the verifier's vocabulary")
    g.add_argument("--token-freq-path", default=None, help="default: <data-path>/token_freq.pt")
    g.add_argument(
        "--target-layer-ids",
        type=int,
        nargs="+",
        default=None,
        help="3 aux ids, or 4 with the last layer N; default 2 N//2 N-3",
    )
    g.add_argument("--norm-before-residual", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--norm-before-fc", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--fc-norm", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--norm-output", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--embed-requires-grad", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument(
        "--ttt-steps", type=int, default=None, help=f"Eagle-3 training-time-test steps (default {_DRAFT['ttt_steps']})"
    )
    g.add_argument("--ttt-step-loss-decay", type=float, default=None)
    g.add_argument(
        "--num-depths", type=int, default=None, help=f"P-EAGLE parallel depths (default {_DRAFT['num_depths']})"
    )
    g.add_argument(
        "--down-sample-ratio",
        type=float,
        default=None,
        help=f"P-EAGLE COD ratio r (default {_DRAFT['down_sample_ratio']})",
    )
    g.add_argument(
        "--down-sample-ratio-min",
        type=float,
        default=None,
        help=f"P-EAGLE COD floor (default {_DRAFT['down_sample_ratio_min']})",
    )
    g.add_argument(
        "--max-anchors", type=int, default=None, help=f"P-EAGLE COD seeds per batch (default {_DRAFT['max_anchors']})"
    )
    g.add_argument("--mask-token-id", type=int, default=None, help="P-EAGLE mask token (default: resolved)")
    g.add_argument("--loss-fn", default=None, choices=LOSS_FUNCTIONS, help=f"default {_DRAFT['loss_fn']}")
    g.add_argument(
        "--attention-backend", default=None, choices=ATTENTION_BACKENDS, help=f"default {_DRAFT['attention_backend']}"
    )

    g = p.add_argument_group("data")
    g.add_argument(
        "--data-path",
        default="./data",
        help="prepared dataset (draftstream prepare output), or a traffic log (draftstream serve --capture-dir): "
        "then the run trains on served traffic as it comes, chunk by chunk (live; needs --stream-endpoint)",
    )
    g.add_argument(
        "--live-chunk-rows", type=int, default=64, help="live: rows of traffic per chunk (one epoch, one checkpoint)"
    )
    g.add_argument(
        "--live-val-every", type=int, default=8, help="live: every N-th row of a chunk is held out (0: none)"
    )
    g.add_argument("--live-max-tokens", type=int, default=2048, help="live: longer rows are dropped (counted)")
    g.add_argument(
        "--hidden-states-path", default=None, help="hs_{i}.safetensors files; default <data-path>/hidden_states"
    )
    g.add_argument(
        "--on-missing",
        default=ON_MISSING[0],
        choices=ON_MISSING,
        help="a missing/unreadable hidden-state file: stop, or leave the sample out (warn: with a warning)",
    )
    split = g.add_mutually_exclusive_group()
    split.add_argument(
        "--val-ratio", type=float, default=None, help=f"fraction of rows held out for validation (default {VAL_RATIO})"
    )
    split.add_argument("--train-data-ratio", type=float, default=None, help="1 - --val-ratio (speculators' name)")
    g.add_argument("--total-seq-len", type=int, default=_LOOP["total_seq_len"], help="tokens per packed batch per rank")
    g.add_argument(
        "--noise-std",
        type=float,
        default=_LOOP["noise_std"],
        help="uniform noise [-std, std) on aux states, training only",
    )

    g = p.add_argument_group("streaming (instead of --hidden-states-path: producers send hidden states live)")
    g.add_argument(
        "--stream-endpoint",
        default=None,
        help="ipc://DIR or tcp://HOST:PORT on this node; rank r binds control/data at DIR/rank{r}-*.sock, or at "
        "PORT+2l, PORT+2l+1 with l its local rank on the node. Producers need only rank 0's address: it lists every rank's",
    )
    g.add_argument(
        "--buffer-bytes",
        type=int,
        default=None,
        help=f"replay buffer budget per rank; default: what the flags need, {BUFFER_HEADROOM:g} x the most bytes "
        f"that samples waiting for their next --reuse use hold at once, and at least {BATCHES_BUFFERED} full batches. "
        "A smaller value is refused before training starts",
    )
    g.add_argument(
        "--lease-seconds",
        type=float,
        default=_STREAM["lease_seconds"],
        help="a grant not delivered in time goes to another producer",
    )
    g.add_argument(
        "--stall-timeout",
        dest="stall_timeout_seconds",
        type=float,
        default=_STREAM["stall_timeout_seconds"],
        help="give up when a batch's samples do not arrive in time",
    )
    g.add_argument(
        "--reuse",
        type=int,
        default=_LOOP["reuse"],
        help="train every sample K times per epoch, its uses within --reuse-window samples: the target runs once per K uses",
    )
    g.add_argument(
        "--reuse-window",
        type=int,
        default=_LOOP["reuse_window"],
        help="samples whose --reuse uses are interleaved (the buffer must hold them)",
    )
    g.add_argument("--spill-dir", default=None, help="also write every received sample as hs_{i}.safetensors (tee)")
    g.add_argument(
        "--skip-nonfinite", action="store_true", help="skip and count samples with NaN/Inf instead of stopping"
    )
    g.add_argument(
        "--target-dtype", default=None, help="dtype producers capture in (default: the verifier checkpoint's)"
    )
    g.add_argument("--allow-remote", action="store_true", help="allow binding addresses other hosts can reach")
    g.add_argument(
        "--advertise-host",
        default=None,
        help="host name producers dial this rank at (default: as bound; this host's name when binding tcp://0.0.0.0)",
    )
    g.add_argument(
        "--curve-secret-key", default=None, help="CURVE: this trainer's secret key file (draftstream keygen)"
    )
    g.add_argument("--curve-authorized-keys", default=None, help="CURVE: directory of producer public keys allowed in")

    g = p.add_argument_group("training")
    g.add_argument("--save-path", default="./checkpoints")
    g.add_argument("--epochs", type=int, default=_LOOP["epochs"])
    g.add_argument("--max-steps", type=int, default=_LOOP["max_steps"], help="stop after this many optimizer steps")
    g.add_argument(
        "--time-budget",
        dest="time_budget_seconds",
        type=float,
        metavar="SECONDS",
        default=_LOOP["time_budget_seconds"],
        help="train for this many wall-clock seconds: after timing the first steps, the lr schedule is fitted "
        "(and refitted every step) to the steps that fit in the time left, so it ends when the budget does; "
        "the run then validates, writes an epoch checkpoint and exits 0. Counted from the first step, across "
        "resumes; never longer than --epochs / --max-steps",
    )
    g.add_argument("--lr", type=float, default=_LOOP["lr"])
    g.add_argument("--optimizer", default=_LOOP["optimizer"], choices=OPTIMIZERS)
    g.add_argument("--weight-decay", type=float, default=_LOOP["weight_decay"])
    g.add_argument("--muon-lr", type=float, default=_LOOP["muon_lr"], help="default 10 x --lr")
    g.add_argument("--muon-momentum", type=float, default=_LOOP["muon_momentum"])
    g.add_argument("--muon-weight-decay", type=float, default=_LOOP["muon_weight_decay"])
    g.add_argument("--scheduler-type", default=_LOOP["scheduler_type"], choices=SCHEDULERS)
    g.add_argument(
        "--scheduler-warmup-steps", "--warmup-steps", dest="warmup_steps", type=int, default=_LOOP["warmup_steps"]
    )
    g.add_argument(
        "--scheduler-warmup-ratio", "--warmup-ratio", dest="warmup_ratio", type=float, default=_LOOP["warmup_ratio"]
    )
    g.add_argument(
        "--scheduler-num-cosine-cycles", dest="num_cosine_cycles", type=float, default=_LOOP["num_cosine_cycles"]
    )
    g.add_argument("--max-grad-norm", type=float, default=_LOOP["max_grad_norm"], help="0 disables clipping")
    g.add_argument(
        "--grad-accum-steps", type=int, default=_LOOP["grad_accum_steps"], help="batches per rank per optimizer step"
    )
    g.add_argument("--seed", type=int, default=_LOOP["seed"])
    g.add_argument("--device", default="auto", help="auto, cpu, cuda (cuda:LOCAL_RANK under torchrun)")
    g.add_argument(
        "--precision", default=_LOOP["precision"], choices=PRECISIONS, help="auto: bf16 on CUDA, fp32 on CPU"
    )

    g = p.add_argument_group("checkpoints and logs")
    g.add_argument(
        "--checkpoint-freq", type=int, default=_LOOP["checkpoint_freq"], help="epochs between epoch checkpoints"
    )
    g.add_argument(
        "--save-every-steps",
        type=int,
        default=_LOOP["save_every_steps"],
        help="also write <save-path>/latest/ every N steps",
    )
    g.add_argument(
        "--save-best",
        action="store_true",
        help="accepted for speculators compatibility; checkpoint_best is always kept",
    )
    g.add_argument("--no-resume-from-checkpoint", action="store_true", help="ignore checkpoints already in --save-path")
    g.add_argument("--log-every", type=int, default=_LOOP["log_every"], help="steps between log lines")
    g.add_argument("--tracker", "--logger", dest="tracker", default=_LOOP["tracker"], choices=TRACKERS)
    g.add_argument("--log-dir", default=_LOOP["log_dir"], help="tracker directory; default <save-path>/logs")
    g.add_argument("--run-name", default=_LOOP["run_name"])
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _draft_kwargs(args: argparse.Namespace) -> dict:
    """The model flags given (not ``None``), by ``DraftConfig`` field name."""
    return config_kwargs(DraftConfig, args, given_only=True, skip=_DRAFT_FIXED)


def _changed_model_flags(config, speculator_type: str, draft_kwargs: dict) -> list[str]:
    """Model flags given now that differ from the checkpoint being resumed (objective knobs in
    ``_DRAFT_OVERRIDES`` may change between runs; the architecture may not)."""
    given = {"speculator_type": speculator_type, **{k: v for k, v in draft_kwargs.items() if k not in _DRAFT_OVERRIDES}}
    return [
        f"--{name.replace('_', '-')} {value!r}, checkpoint {getattr(config, name)!r}"
        for name, value in given.items()
        if getattr(config, name) != value
    ]


def _val_ratio(args: argparse.Namespace) -> float:
    if args.train_data_ratio is not None:
        return 1.0 - args.train_data_ratio
    return VAL_RATIO if args.val_ratio is None else args.val_ratio


def main(argv: list[str] | None = None, *, make_file_source: Callable | None = None) -> int:
    """``draftstream train``. ``make_file_source``: builds the file source instead of
    ``FileSampleSource`` (same arguments; a benchmark's seam, e.g. one that preloads the files)."""
    args = build_parser().parse_args(argv)
    # Imported here rather than at the top so `draftstream train --help` and flag errors come back
    # without loading transformers and datasets.
    from protocol.dataset import open_rows
    from protocol.logs import setup_logging
    from protocol.trafficlog import TrafficLog
    from trainer.data.batch import make_filler_batch
    from trainer.data.sources import FileSampleSource, split_train_val
    from trainer.models.export import build_draft, load_draft, save_draft
    from trainer.models.verifier import read_verifier_config
    from trainer.training import checkpoint as ckpt
    from trainer.training.distributed import broadcast_ids, close_distributed, init_distributed, shard_model
    from trainer.training.loop import Trainer

    try:
        env = init_distributed(args.device)
    except ValueError as e:
        print(f"draftstream train: error: {e}", file=sys.stderr)
        return 2
    setup_logging("trainer", rank=env.rank)
    try:
        try:
            loop_config = config_from_args(LoopConfig, args, progress=not args.no_progress)
            verifier_config = read_verifier_config(args.verifier_name_or_path)
            aux_ids = aux_layer_ids(args.target_layer_ids, int(verifier_config["num_hidden_layers"]))
            hidden = int(verifier_config["hidden_size"])

            dataset = open_rows(
                args.data_path, vocab_size=int(verifier_config["vocab_size"]), max_tokens=args.live_max_tokens
            )
            live_plans = None
            if isinstance(dataset, TrafficLog):
                loop_config = _live_loop_config(list(sys.argv[1:] if argv is None else argv), loop_config)
                live_plans = _live_plans(args, loop_config, dataset, world_size=env.world_size)
                train_ids, val_ids = [], []
            else:
                train_ids, val_ids = split_train_val(len(dataset), val_ratio=_val_ratio(args), seed=args.seed)
            if live_plans is not None and not args.stream_endpoint:
                raise ValueError(f"{args.data_path} is a traffic log: live training needs --stream-endpoint")
            if args.stream_endpoint:
                if args.hidden_states_path:
                    raise ValueError(
                        "give --hidden-states-path (files) or --stream-endpoint (live producers), not both"
                    )
                source = _stream_source(
                    args,
                    env,
                    dataset,
                    verifier_config,
                    aux_ids,
                    loop_config=loop_config,
                    train_ids=train_ids,
                    val_ids=val_ids,
                    live_plans=live_plans,
                )
                num_captured, hs_dtype = len(aux_ids) + 1, DTYPES[source.target.dtype]
            else:
                hs_dir = args.hidden_states_path or str(Path(args.data_path) / "hidden_states")
                source = (make_file_source or FileSampleSource)(dataset, hs_dir, on_missing=args.on_missing)
                if env.is_main:
                    train_ids, val_ids = source.available(train_ids), source.available(val_ids)
                train_ids, val_ids = broadcast_ids(train_ids, env), broadcast_ids(val_ids, env)
                if not train_ids:
                    raise ValueError(f"no training samples with hidden-state files in {hs_dir}")
                (_, num_captured, file_hidden), hs_dtype = source.peek(train_ids[0])
                if num_captured != len(aux_ids) + 1 or file_hidden != hidden:
                    raise ValueError(
                        f"{hs_dir}: files hold [T, {num_captured}, {file_hidden}] hidden states; the draft needs "
                        f"[T, {len(aux_ids) + 1}, {hidden}] (3 aux layers + the last; check --target-layer-ids)"
                    )

            torch.manual_seed(args.seed)  # every rank builds the same initial weights
            draft_kwargs = _draft_kwargs(args)
            overrides = {k: v for k, v in draft_kwargs.items() if k in _DRAFT_OVERRIDES}
            resume_dir = None if args.no_resume_from_checkpoint else ckpt.find_resume_checkpoint(args.save_path)
            if resume_dir is not None:
                model = load_draft(resume_dir, verifier_name_or_path=args.verifier_name_or_path, **overrides)
                changed = _changed_model_flags(model.config, args.speculator_type, draft_kwargs)
                if changed:
                    raise ValueError(
                        f"{resume_dir} was trained with another model: {'; '.join(changed)}. Resume with the "
                        "model flags it was started with, or pass --no-resume-from-checkpoint to start over"
                    )
                ckpt.load_master_weights(model, resume_dir)
            elif args.from_pretrained:
                logger.info("fine-tuning from %s", args.from_pretrained)
                model = load_draft(args.from_pretrained, verifier_name_or_path=args.verifier_name_or_path, **overrides)
            else:
                config = DraftConfig(
                    speculator_type=args.speculator_type,
                    verifier_name_or_path=args.verifier_name_or_path,
                    aux_layer_ids=aux_ids,
                    **draft_kwargs,
                )
                model = build_draft(config, _token_freq(args))
            if list(model.config.aux_layer_ids) != aux_ids:
                raise ValueError(
                    f"the draft was trained on aux layers {model.config.aux_layer_ids}, the files/flags say {aux_ids}"
                )
        except ValueError as e:
            logger.error("%s", e)
            return 2

        model = shard_model(model, env, bf16=loop_config.bf16(env.device))
        trainer = Trainer(
            model=model,
            config=loop_config,
            env=env,
            train_source=source,
            train_ids=train_ids,
            val_ids=val_ids,
            filler=make_filler_batch(num_layers=num_captured, hidden_size=hidden, dtype=hs_dtype),
            save_draft=save_draft,
            run_config=vars(args),
            plans=live_plans,
        )
        if resume_dir is not None:
            trainer.restore(resume_dir)
        logger.info(
            "%s draft, %d trainable parameters, %d train / %d validation samples, world %d, %d steps planned",
            model.config.speculator_type,
            sum(p.numel() for p in trainer.params),
            len(train_ids),
            len(val_ids),
            env.world_size,
            trainer.total_steps,
        )
        if live_plans is not None:
            logger.info(
                "live traffic from %s: chunks of %d rows (every %d-th held out), each one epoch and one checkpoint",
                args.data_path,
                args.live_chunk_rows,
                args.live_val_every,
            )
        result = None
        try:
            result = trainer.fit()
        finally:
            source.close(
                "trainer failed" if result is None else "trainer stopped" if result.signal else "training finished"
            )
        logger.info("%s at global step %d", result.status, result.global_step)
        return 128 + result.signal if result.status == "interrupted" and result.signal else 0
    finally:
        close_distributed(env)


def _target_spec(args: argparse.Namespace, dataset, verifier_config: dict, aux_ids: list[int]) -> TargetSpec:
    """What this rank's producers must capture: the handshake's reference."""
    dtype = args.target_dtype or checkpoint_dtype(verifier_config)
    if dtype not in DTYPES:
        raise ValueError(f"--target-dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return TargetSpec(
        target_model=args.verifier_name_or_path,
        layer_ids=[*aux_ids, int(verifier_config["num_hidden_layers"])],
        hidden_size=int(verifier_config["hidden_size"]),
        dtype=dtype,
        vocab_size=int(verifier_config["vocab_size"]),
        dataset_fingerprint=dataset.fingerprint,
    )


def planned_peak_bytes(
    loop_config: LoopConfig,
    dataset,
    target: TargetSpec,
    train_ids: list[int],
    val_ids: list[int],
    *,
    world_size: int,
    ranks: list[int],
) -> list[int]:
    """For each of ``ranks``, the most bytes its replay buffer must hold at once over every epoch's
    planned fetch order (``StreamConfig.planned_peak_bytes``): what ``--reuse`` keeps waiting for
    its next use."""
    from trainer.training.loop import plan_epochs, plan_validation, planned_fetch_orders

    ids = [*train_ids, *val_ids]
    length = dict(zip(ids, dataset.lengths(ids)))
    dtype = DTYPES[target.dtype]
    nbytes = {sid: sample_nbytes(n, len(target.layer_ids), target.hidden_size, dtype) for sid, n in length.items()}
    plans = plan_epochs(loop_config, train_ids, [length[i] for i in train_ids], world_size)
    val_plan = plan_validation(loop_config, val_ids, [length[i] for i in val_ids], world_size)
    return [
        max(
            (
                peak_live_bytes(ids, nbytes.__getitem__)
                for ids in planned_fetch_orders(loop_config, plans, val_plan, rank=r)
            ),
            default=0,
        )
        for r in ranks
    ]


def live_peak_bytes(
    loop_config: LoopConfig, target: TargetSpec, plans, max_tokens: int, *, world_size: int, rank: int
) -> int:
    """The replay buffer a live run needs: two chunks in flight (the one training and the next one's
    first samples) of rows all ``--live-max-tokens`` long, through their planned fetch order."""
    from trainer.data.plan import BatchPlan
    from trainer.training.loop import planned_fetch_orders

    rows = range(plans.chunk_rows)
    held = [i for i in rows if plans.val_every and i % plans.val_every == plans.val_every - 1]
    train = [i for i in rows if i not in set(held)]
    common = dict(seed=loop_config.seed, epoch=0, total_seq_len=loop_config.total_seq_len)
    plan = BatchPlan.build(
        sample_ids=train,
        lengths=[max_tokens] * len(train),
        world_size=world_size * loop_config.grad_accum_steps,
        reuse=loop_config.reuse,
        reuse_window=loop_config.reuse_window,
        **common,
    )
    val = (
        BatchPlan.build(
            sample_ids=held, lengths=[max_tokens] * len(held), world_size=world_size, shuffle=False, **common
        )
        if held
        else None
    )
    nbytes = sample_nbytes(max_tokens, len(target.layer_ids), target.hidden_size, DTYPES[target.dtype])
    [ids] = planned_fetch_orders(loop_config, [plan], val, rank=rank)
    return 2 * peak_live_bytes(ids, lambda _: nbytes)


def _live_plans(args: argparse.Namespace, loop_config: LoopConfig, dataset, *, world_size: int):
    """The chunk plans of a live run over traffic log ``dataset`` (``trainer.data.live``)."""
    from trainer.data.live import LivePlans

    return LivePlans(
        dataset,
        chunk_rows=args.live_chunk_rows,
        val_every=args.live_val_every,
        epochs=loop_config.epochs,
        seed=loop_config.seed,
        world_size=world_size,
        logical_world_size=world_size * loop_config.grad_accum_steps,
        total_seq_len=loop_config.total_seq_len,
        reuse=loop_config.reuse,
        reuse_window=loop_config.reuse_window,
    )


def _live_loop_config(argv: list[str], loop_config: LoopConfig) -> LoopConfig:
    """A live run trains until stopped: without --max-steps its learning rate stays constant after
    warmup (--scheduler-type none), and without --epochs it takes every chunk that comes."""

    def given(flag: str) -> bool:  # on the command line, whatever its value
        return any(a == flag or a.startswith(flag + "=") for a in argv)

    changes = {}
    if not given("--epochs"):
        changes["epochs"] = LIVE_CHUNKS
    if loop_config.max_steps is None:
        if loop_config.scheduler_type != "none" and given("--scheduler-type"):
            raise ValueError(
                "live training without --max-steps has no end to decay the learning rate to: "
                "use --scheduler-type none or give --max-steps"
            )
        changes["scheduler_type"] = "none"
    if loop_config.time_budget_seconds is not None:
        raise ValueError("--time-budget fits a planned schedule; live training has none (use --max-steps)")
    return dataclasses.replace(loop_config, **changes)


def _stream_config(
    args: argparse.Namespace, *, rank: int, planned_peak: int, local_rank: int | None = None
) -> StreamConfig:
    """This rank's ``StreamConfig``; refuses a ``--buffer-bytes`` below ``planned_peak``."""
    curve = None
    if args.curve_secret_key:
        authorized = Path(args.curve_authorized_keys) if args.curve_authorized_keys else None
        curve = CurveKeys(secret_file=Path(args.curve_secret_key), authorized_keys_dir=authorized)
    socket = dataclasses.replace(StreamConfig.default_socket(), allow_remote=args.allow_remote, curve=curve)
    return config_from_args(
        StreamConfig,
        args,
        rank=rank,
        local_rank=local_rank,
        endpoint=args.stream_endpoint,
        batch_tokens=args.total_seq_len * args.grad_accum_steps,
        planned_peak_bytes=planned_peak,
        socket=socket,
    )


def _stream_source(
    args: argparse.Namespace,
    env,
    dataset,
    verifier_config: dict,
    aux_ids: list[int],
    *,
    loop_config: LoopConfig,
    train_ids: list[int],
    val_ids: list[int],
    live_plans=None,
):
    """This rank's live sample source: binds its endpoints and waits for producers."""
    from trainer.training.distributed import all_gather_text

    target = _target_spec(args, dataset, verifier_config, aux_ids)
    if live_plans is None:
        [peak] = planned_peak_bytes(
            loop_config, dataset, target, train_ids, val_ids, world_size=env.world_size, ranks=[env.rank]
        )
        max_tokens = max(dataset.lengths(range(len(dataset))), default=0)
    else:
        peak = live_peak_bytes(
            loop_config, target, live_plans, args.live_max_tokens, world_size=env.world_size, rank=env.rank
        )
        max_tokens = args.live_max_tokens
    config = _stream_config(args, rank=env.rank, local_rank=env.local_rank, planned_peak=peak)
    # Every rank's control endpoint, as producers dial it: any rank's Welcome lists them all, so a
    # producer needs only rank 0's address, wherever the other ranks run (torchrun --nnodes N).
    control, _ = config.advertised_endpoints()
    config = dataclasses.replace(config, trainer_endpoints=all_gather_text(control, env))
    if args.spill_dir:
        Path(args.spill_dir).mkdir(parents=True, exist_ok=True)
    source = StreamSampleSource(
        config,
        target,
        lengths=lambda sid: dataset.lengths([sid])[0],
        expected_row=dataset.row,
        max_tokens=max_tokens,
    ).start()
    logger.info(
        "streaming: control %s, data %s, buffer %.1f MB (the plan holds at most %.1f MB at once)",
        source.control_endpoint,
        source.data_endpoint,
        source.buffer.budget_bytes / 1e6,
        peak / 1e6,
    )
    return source


def check_stream_flags(argv: list[str], *, world_size: int) -> None:
    """What ``draftstream run`` checks before it starts producers: ``train``'s flags parse and
    validate, and every rank's replay buffer can hold its plan. Raises ``ValueError`` naming the
    flag (a flag that does not parse exits like ``train`` would)."""
    from protocol.dataset import open_rows
    from protocol.trafficlog import TrafficLog
    from trainer.data.sources import split_train_val
    from trainer.models.verifier import read_verifier_config

    args = build_parser().parse_args(argv)
    loop_config = config_from_args(LoopConfig, args, progress=False)
    verifier_config = read_verifier_config(args.verifier_name_or_path)
    aux_ids = aux_layer_ids(args.target_layer_ids, int(verifier_config["num_hidden_layers"]))
    dataset = open_rows(args.data_path, max_tokens=args.live_max_tokens)
    target = _target_spec(args, dataset, verifier_config, aux_ids)
    ranks = list(range(world_size))
    if isinstance(dataset, TrafficLog):
        loop_config = _live_loop_config(argv, loop_config)
        plans = _live_plans(args, loop_config, dataset, world_size=world_size)
        peaks = [
            live_peak_bytes(loop_config, target, plans, args.live_max_tokens, world_size=world_size, rank=r)
            for r in ranks
        ]
    else:
        train_ids, val_ids = split_train_val(len(dataset), val_ratio=_val_ratio(args), seed=args.seed)
        peaks = planned_peak_bytes(loop_config, dataset, target, train_ids, val_ids, world_size=world_size, ranks=ranks)
    for rank, peak in zip(ranks, peaks):
        _stream_config(args, rank=rank, planned_peak=peak)


def _token_freq(args: argparse.Namespace) -> dict[int, int] | None:
    path = Path(args.token_freq_path or Path(args.data_path) / "token_freq.pt")
    if not path.is_file():
        if args.token_freq_path:
            raise ValueError(f"--token-freq-path {path}: no such file")
        return None
    return {int(k): int(v) for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}


if __name__ == "__main__":
    # `torchrun -m trainer.train` and `python -m trainer.train` land here.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
