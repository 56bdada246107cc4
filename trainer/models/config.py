"""``DraftConfig``: everything that shapes a draft model and its objective, validated once.

Field names follow the ``draftstream train`` / speculators flags; the checkpoint's ``config.json``
records the architecture fields (``trainer.models.export``).
"""

from __future__ import annotations

import dataclasses

SPECULATOR_TYPES = ("eagle3", "peagle")
ATTENTION_BACKENDS = ("auto", "sdpa", "flex")
LOSS_FUNCTIONS = ("kl_div", "ce")
DRAFT_ARCHS = ("llama", "qwen3")


@dataclasses.dataclass(kw_only=True)
class DraftConfig:
    """Everything that shapes a draft model and its objective. Fields named after the
    speculators/draftstream CLI flags; ``None`` defaults are resolved per algorithm."""

    speculator_type: str  # --speculator-type: "eagle3" | "peagle"
    verifier_name_or_path: str  # --verifier-name-or-path: local dir with config.json + *.safetensors
    aux_layer_ids: list[int]  # --target-layer-ids without the last id: the 3 auxiliary layers
    num_layers: int = 1  # --num-layers: draft decoder layers
    draft_vocab_size: int | None = None  # --draft-vocab-size; None = the verifier's full vocab
    # Eagle-3 training-time test.
    ttt_steps: int = 3  # --ttt-steps
    ttt_step_loss_decay: float = 1.0  # --ttt-step-loss-decay: step s loss weighted decay**s
    # P-EAGLE (speculators defaults).
    num_depths: int = 8  # --num-depths: K parallel depths
    down_sample_ratio: float = 0.7  # --down-sample-ratio: COD r
    down_sample_ratio_min: float = 0.2  # --down-sample-ratio-min: COD floor
    max_anchors: int = 512  # --max-anchors: COD seeds per row
    mask_token_id: int | None = None  # --mask-token-id; None = resolved from the verifier (see build_draft)
    # Architecture switches, named as in the speculators config.json (which is what vLLM reads).
    norm_before_residual: bool = True  # --no-norm-before-residual turns it off
    # One RMSNorm ``input_norm`` over the concatenated A*H aux states before ``fc`` (SPEC: on by
    # default). speculators/vLLM call this ``norm_before_fc``.
    norm_before_fc: bool = True
    # Per-aux-layer RMSNorms ``fc_norm.{i}`` before concatenation (Eagle 3.1). NOTE: this is the
    # speculators/vLLM meaning of ``fc_norm``; the single norm over the concatenation is
    # ``norm_before_fc`` above. The two are mutually exclusive.
    fc_norm: bool = False
    # Feed the post-``norm`` hidden state to the next TTT step / depth (Eagle 3.1).
    norm_output: bool = False
    embed_requires_grad: bool | None = None  # None: False for eagle3, True for peagle (SPEC)
    draft_arch: str | None = None  # "llama" | "qwen3"; None = the verifier's if it is one, else llama
    loss_fn: str = "kl_div"  # "kl_div" = forward KL(target || draft); "ce" = cross-entropy on the target argmax
    attention_backend: str = "auto"  # auto = flex on CUDA, sdpa elsewhere

    def __post_init__(self) -> None:
        if self.speculator_type not in SPECULATOR_TYPES:
            raise ValueError(f"--speculator-type must be one of {SPECULATOR_TYPES}, got {self.speculator_type!r}")
        if len(self.aux_layer_ids) != 3:
            raise ValueError(
                f"--target-layer-ids must name 3 auxiliary layers (plus the last), got aux ids {self.aux_layer_ids}"
            )
        if self.num_layers < 1:
            raise ValueError(f"--num-layers must be >= 1, got {self.num_layers}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise ValueError(f"--draft-vocab-size must be >= 1, got {self.draft_vocab_size}")
        if self.ttt_steps < 1:
            raise ValueError(f"--ttt-steps must be >= 1, got {self.ttt_steps}")
        if self.ttt_step_loss_decay <= 0:
            raise ValueError(f"--ttt-step-loss-decay must be > 0, got {self.ttt_step_loss_decay}")
        if self.num_depths < 1:
            raise ValueError(f"--num-depths must be >= 1, got {self.num_depths}")
        if not 0 < self.down_sample_ratio <= 1:
            raise ValueError(f"--down-sample-ratio must be in (0, 1], got {self.down_sample_ratio}")
        if not 0 <= self.down_sample_ratio_min <= 1:
            raise ValueError(f"--down-sample-ratio-min must be in [0, 1], got {self.down_sample_ratio_min}")
        if self.max_anchors < 1:
            raise ValueError(f"--max-anchors must be >= 1, got {self.max_anchors}")
        if self.norm_before_fc and self.fc_norm:
            raise ValueError("norm_before_fc (input_norm) and fc_norm (per-layer norms) are mutually exclusive")
        if self.fc_norm and self.speculator_type == "peagle":
            # vLLM (0.33) builds P-EAGLE drafts without per-layer fc norms: such a checkpoint
            # would not load in `vllm serve`.
            raise ValueError("fc_norm is not supported for --speculator-type peagle (vLLM cannot serve it)")
        if self.draft_arch is not None and self.draft_arch not in DRAFT_ARCHS:
            raise ValueError(f"--draft-arch must be llama or qwen3, got {self.draft_arch!r}")
        if self.loss_fn not in LOSS_FUNCTIONS:
            raise ValueError(f"--loss-fn must be one of {LOSS_FUNCTIONS}, got {self.loss_fn!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"--attention-backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.embed_requires_grad is None:
            self.embed_requires_grad = self.speculator_type == "peagle"

    @property
    def num_aux(self) -> int:
        return len(self.aux_layer_ids)

    @property
    def speculative_tokens(self) -> int:
        """K in the checkpoint's greedy proposal: tokens proposed per verifier step."""
        return self.ttt_steps if self.speculator_type == "eagle3" else self.num_depths
