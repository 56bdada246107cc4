"""What one ``draftstream produce`` process runs with: its flags (``ProduceConfig``), the captured
layout they imply, and the capture backend they choose. Both runs use it: the spill run
(``producer.spill_run``) and the stream run (``producer.stream_run``); ``producer.produce`` is the
command line over them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from producer.backend import DTYPE_CHOICES, CaptureBackend, PushingBackend
from protocol.target import capture_layer_ids, read_text_config

BACKENDS = ("hf", "vllm")


@dataclasses.dataclass(kw_only=True)
class ProduceConfig:
    model: str
    data: str
    spill: str | None = None  # --spill DIR: offline mode
    connect: list[str] | None = None  # --connect ENDPOINT...: streaming mode (trainer grants the rows)
    num_ranks: int | None = None  # --num-ranks: checked against what each trainer lists
    producer_id: str | None = None
    handshake_timeout: float = 600.0
    curve_secret_key: str | None = None
    curve_server_key: str | None = None
    max_samples: int | None = None
    backend: str = "hf"
    dtype: str = "auto"
    device: str = "auto"
    target_layer_ids: list[int] | None = None
    max_batch_tokens: int = 8192
    share_window_bytes: int = 2 << 30  # --share-window-bytes: captures kept for other trainer jobs
    validate: bool = False
    world_size: int = 1
    rank: int = 0
    skip_nonfinite: bool = False
    # --backend vllm only:
    endpoint: str | None = None  # a running `draftstream launch-vllm` server; None: in-process engine
    served_model_name: str | None = None
    concurrency: int = 16
    report_endpoint: str | None = None
    report_timeout: float = 300.0
    vllm_engine_args: str | None = None  # JSON object of extra vllm.LLM arguments

    def __post_init__(self) -> None:
        if (self.spill is None) == (not self.connect):
            raise ValueError(
                "give exactly one of --spill DIR (write files) or --connect ENDPOINT (stream to a trainer)"
            )
        if self.connect and (self.validate or self.world_size != 1 or self.max_samples is not None):
            raise ValueError(
                "--validate, --world-size and --max-samples apply to --spill; with --connect the trainer decides the rows"
            )
        if self.backend != "vllm":
            given = [
                flag
                for flag, value in (
                    ("--endpoint", self.endpoint),
                    ("--served-model-name", self.served_model_name),
                    ("--report-endpoint", self.report_endpoint),
                    ("--vllm-engine-args", self.vllm_engine_args),
                )
                if value
            ]
            if given:
                raise ValueError(f"{', '.join(given)} apply to --backend vllm only")
        elif self.device != "auto":
            raise ValueError(
                "--device applies to --backend hf; vLLM places itself (CUDA_VISIBLE_DEVICES, --vllm-engine-args)"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"--dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"--max-samples must be >= 1, got {self.max_samples}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"--rank must be in [0, --world-size); got rank {self.rank}, world size {self.world_size}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"--max-batch-tokens must be >= 1, got {self.max_batch_tokens}")


def captured_layout(config: ProduceConfig) -> tuple[list[int], int]:
    """(layer ids, hidden size) from the target's config alone: validation needs no weights."""
    text = read_text_config(config.model)
    return capture_layer_ids(config.target_layer_ids, int(text["num_hidden_layers"])), int(text["hidden_size"])


def make_backend(
    config: ProduceConfig, *, layer_ids: list[int], spill_dir: Path | None = None
) -> CaptureBackend | PushingBackend:
    """The backend ``config.backend`` names (``HFCapture`` or vLLM's), capturing ``layer_ids``
    (``captured_layout``); an in-process vLLM engine may spill under ``spill_dir`` only."""
    if config.backend == "vllm":
        return _vllm_backend(config, layer_ids=layer_ids, spill_dir=spill_dir)
    # Backends load on demand: HF capture brings transformers, vLLM's needs vLLM's environment.
    from producer.capture import CaptureConfig, HFCapture

    return HFCapture(
        CaptureConfig(
            model=config.model,
            dtype=config.dtype,
            device=config.device,
            layer_ids=layer_ids,
            max_batch_tokens=config.max_batch_tokens,
        )
    )


def _vllm_backend(config: ProduceConfig, *, layer_ids: list[int], spill_dir: Path | None):
    import json

    from producer.vllm.backend import VLLMBackend, VLLMBackendConfig

    try:
        engine_args = json.loads(config.vllm_engine_args) if config.vllm_engine_args else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--vllm-engine-args must be a JSON object: {e}") from None
    if not isinstance(engine_args, dict):
        raise ValueError("--vllm-engine-args must be a JSON object, e.g. '{\"gpu_memory_utilization\": 0.8}'")
    extra: dict = {"spill_dirs": [str(spill_dir.resolve())]} if spill_dir is not None else {}
    if config.curve_secret_key:
        extra.update(
            curve_secret_key=str(Path(config.curve_secret_key).resolve()),
            curve_server_key=str(Path(config.curve_server_key).resolve()),
        )
    return VLLMBackend(
        VLLMBackendConfig(
            model=config.model,
            layer_ids=layer_ids,
            dtype=config.dtype,
            endpoint=config.endpoint,
            served_model_name=config.served_model_name,
            concurrency=config.concurrency,
            report_endpoint=config.report_endpoint,
            engine_args=engine_args,
            connector_extra=extra,
        )
    )
