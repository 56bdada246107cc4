"""vLLM KV connector that sends each finished request's hidden states to a draftstream trainer rank.

vLLM (0.33) captures the target's hidden states with the speculative method
``extract_hidden_states``: a cache-only "attention" layer writes the states at the ids of
``eagle_aux_hidden_state_layer_ids`` into a KV-cache group of their own, one head per captured layer.
This connector reads them out of that cache. Load it through ``kv_connector_module_path``::

    --kv-transfer-config '{"kv_connector": "DraftstreamConnector", "kv_role": "kv_producer",
                           "kv_connector_module_path": "producer.vllm.connector",
                           "kv_connector_extra_config": {"spill_dirs": ["/data/hs"]}}'

(``draftstream launch-vllm`` writes this for you.) Requests carry a ``SampleRoute`` in their
``kv_transfer_params`` (``producer.vllm.params``); other requests pass through untouched.

::

    scheduler process                                 worker process, TP rank 0
    request_finished(req, blocks)                     get_finished(finished ids)
      route + prompt ids + block ids   --metadata-->    gather rows, async D2H copy ---> HSSender thread
      keep the blocks (delay free)                      copy done -> "finished sending"   (push / spill,
    <- blocks freed when the worker says so  <-------                                      reports)

Only TP rank 0 sends, so vLLM expects one "finished sending" per request (``get_finished_count``);
``bind_cache`` refuses a cache that does not hold every captured layer at the full hidden size. ``kv_connector_extra_config`` keys:
``spill_dirs`` (file:// destinations allowed under these; none by default), ``max_pending_samples``,
``max_pending_bytes``, ``send_timeout_seconds``, ``chunk_bytes``, ``fsync``, and
``curve_secret_key`` + ``curve_server_key`` when the trainer's data endpoints use CURVE.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

from producer.vllm.params import PARAMS_KEY, SampleRoute
from producer.vllm.sender import HostCopier, HostCopy, HSSender, SenderConfig, SendJob
from protocol.codec import DTYPE_NAMES
from protocol.sockets import CurveKeys, SocketConfig

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

_EXTRA_KEYS = {
    "spill_dirs",
    "max_pending_samples",
    "max_pending_bytes",
    "send_timeout_seconds",
    "chunk_bytes",
    "fsync",
    "curve_secret_key",
    "curve_server_key",
}


@dataclasses.dataclass
class FinishedRequest:
    """What the worker needs to send one finished request: its route, prompt ids and blocks."""

    req_id: str
    route: SampleRoute
    token_ids: list[int]
    block_ids: list[int]


@dataclasses.dataclass
class DraftstreamConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step: the requests that finished since the last step."""

    finished: list[FinishedRequest] = dataclasses.field(default_factory=list)


def sender_config(extra: dict[str, Any]) -> SenderConfig:
    """``kv_connector_extra_config`` -> ``SenderConfig``; unknown keys are an error, not a silent no-op."""
    unknown = sorted(set(extra) - _EXTRA_KEYS)
    if unknown:
        raise ValueError(
            f"DraftstreamConnector: unknown kv_connector_extra_config keys {unknown}; known: {sorted(_EXTRA_KEYS)}"
        )
    fields = {k: extra[k] for k in _EXTRA_KEYS - {"curve_secret_key", "curve_server_key"} if k in extra}
    secret, server = extra.get("curve_secret_key"), extra.get("curve_server_key")
    if bool(secret) != bool(server):
        raise ValueError("DraftstreamConnector: CURVE needs both curve_secret_key and curve_server_key")
    curve = CurveKeys(secret_file=Path(secret), server_public_file=Path(server)) if secret else None
    return SenderConfig(**fields, data_socket=SocketConfig(sndhwm=4, rcvhwm=4, curve=curve))


def hidden_state_group_id(kv_cache_config: KVCacheConfig | None) -> int:
    """Index of the KV-cache group holding the captured hidden states."""
    from vllm.v1.kv_cache_interface import HiddenStateCacheSpec

    if kv_cache_config is None:
        return 0
    groups = kv_cache_config.kv_cache_groups
    found = [i for i, group in enumerate(groups) if isinstance(group.kv_cache_spec, HiddenStateCacheSpec)]
    if len(found) == 1:
        return found[0]
    if not found and len(groups) == 1:
        return 0
    raise ValueError(f"expected one hidden-state KV-cache group among {len(groups)}, found {len(found)}")


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the process that started it dies. vLLM's engine core
    is a child of whoever made the engine (a producer, or the API server); a SIGKILLed producer
    otherwise leaves its engine core (and so its workers and their memory) running forever. The
    workers already exit when the engine core does. Elsewhere than Linux: a no-op."""
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError) as e:
        logger.warning("could not tie the engine's life to its parent's (prctl failed: %s)", e)


class DraftstreamConnector(KVConnectorBase_V1, SupportsHMA):
    """Store-only connector: finished requests' hidden states -> trainer ranks or hs files."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        if role == KVConnectorRole.SCHEDULER:  # built inside the engine core process
            die_with_parent()
        spec = vllm_config.speculative_config
        if spec is None or spec.method != "extract_hidden_states":
            raise ValueError(
                "DraftstreamConnector needs --speculative-config with method extract_hidden_states "
                "(draftstream launch-vllm sets it)"
            )
        self.layer_ids = [
            int(k) for k in getattr(spec.draft_model_config.hf_config, "eagle_aux_hidden_state_layer_ids", None) or []
        ]
        if not self.layer_ids:
            raise ValueError(
                "extract_hidden_states needs draft_model_config.hf_config.eagle_aux_hidden_state_layer_ids"
            )
        self.hidden_size = vllm_config.model_config.get_hidden_size()
        self.dtype = DTYPE_NAMES.get(vllm_config.model_config.dtype, str(vllm_config.model_config.dtype))
        self._group_id = hidden_state_group_id(kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self._sender_config = sender_config(extra)

        # Scheduler side.
        self._finished: list[FinishedRequest] = []

        # Worker side.
        self._cache_NLBH: torch.Tensor | None = None
        self._is_sender = True
        self._copier = HostCopier()
        self._sender: HSSender | None = None
        self._waiting: collections.deque[FinishedRequest] = collections.deque()  # no room to copy yet
        self._copies: dict[str, HostCopy | None] = {}  # copy started (None: failed, nothing to wait for)
        self._finished_ids: set[str] = set()

    # ==== scheduler side =========================================================================

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return 0, False  # store-only: nothing to load

    def update_state_after_alloc(self, request: Request, blocks, num_external_tokens: int) -> None:
        pass

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Keep the blocks of our finished requests until the worker has copied their rows out."""
        try:
            route = SampleRoute.from_params(request.kv_transfer_params)
        except ValueError as e:
            logger.error("request %s: bad kv_transfer_params: %s", request.request_id, e)
            return False, {PARAMS_KEY: {"error": str(e)}}
        if route is None:
            return False, None
        prompt = request.prompt_token_ids
        problem = ""
        if prompt is None:
            problem = "the request has no prompt token ids (prompt embeddings are not supported)"
        elif len(prompt) != route.num_tokens:
            problem = f"the prompt has {len(prompt)} tokens but the row has {route.num_tokens}"
        elif request.num_computed_tokens < len(prompt):
            problem = f"the request finished ({request.status.name}) after {request.num_computed_tokens} of {len(prompt)} prompt tokens"
        if problem:
            logger.error("sample %d not captured: %s", route.sample_id, problem)
            return False, {PARAMS_KEY: {"sample_id": route.sample_id, "error": problem}}
        self._finished.append(FinishedRequest(request.request_id, route, list(prompt), list(block_ids)))
        # Echoed to the client, which checks them against what it announced to the trainer.
        capture = {"layer_ids": self.layer_ids, "hidden_size": self.hidden_size, "dtype": self.dtype}
        return True, {PARAMS_KEY: {"sample_id": route.sample_id, "num_tokens": len(prompt), **capture}}

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        if not 0 <= self._group_id < len(block_ids):  # never scheduled: no blocks in any group
            return False, None
        return self.request_finished(request, block_ids[self._group_id])

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = DraftstreamConnectorMetadata(finished=self._finished)
        self._finished = []
        return meta

    def get_finished_count(self) -> int:
        return 1  # only TP rank 0 sends; waiting for every rank would keep blocks forever

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        # A preference, not a requirement. gather_rows reads the cache through vLLM's logical
        # [blocks, layers, block size, hidden] view, so every physical layout yields the same rows.
        # LBNHC (vLLM's own first choice) stores a token's captured layers side by side, the order of
        # a sample's [T, L, H]. vLLM applies it to the whole model's KV cache when every attention
        # backend supports it, and otherwise drops it with a warning: CPU attention supports only
        # LBHNC, and there the captures equal the HF backend's all the same.
        return "LBNHC"

    # ==== worker side ============================================================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.extract_hidden_states import CacheOnlyAttentionLayer

        layers = get_layers_from_vllm_config(self._vllm_config, CacheOnlyAttentionLayer, list(kv_caches))
        if len(layers) != 1:
            raise ValueError(f"expected one hidden-state cache layer among the KV caches, found {sorted(layers)}")
        (name,) = layers
        self.bind_cache(kv_caches[name], tp_rank=get_tensor_model_parallel_rank())

    def bind_cache(self, cache_NLBH: torch.Tensor, *, tp_rank: int = 0) -> None:
        """Use ``cache_NLBH`` [blocks, layers, block size, hidden] as the hidden-state cache."""
        expected = (len(self.layer_ids), self.hidden_size)
        if cache_NLBH.dim() != 4 or (cache_NLBH.shape[1], cache_NLBH.shape[3]) != expected:
            raise ValueError(
                f"hidden-state cache has shape {tuple(cache_NLBH.shape)}, expected [blocks, {expected[0]}, block size, {expected[1]}]"
            )
        if self._kv_cache_config is not None:
            block_size = self._kv_cache_config.kv_cache_groups[self._group_id].kv_cache_spec.block_size
            if cache_NLBH.shape[2] != block_size:
                raise ValueError(f"hidden-state cache block size {cache_NLBH.shape[2]} != the group's {block_size}")
        self._cache_NLBH = cache_NLBH
        self._is_sender = tp_rank == 0
        if self._is_sender and self._sender is None:
            self._sender = HSSender(self._sender_config, name="DraftstreamSend")

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        pass

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        pass  # the cache-only layer already wrote the states; they are read once the request finishes

    def wait_for_save(self) -> None:
        pass

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Start copies for newly finished requests while the sender has room; report the requests
        whose copy is done, so vLLM frees their blocks."""
        if not self._is_sender:
            return None, None
        if self.has_connector_metadata():
            meta = self._get_connector_metadata()
            if isinstance(meta, DraftstreamConnectorMetadata):
                self._waiting.extend(meta.finished)
        # The scheduler lists a request as finished in the same step as its metadata entry.
        tracked = {f.req_id for f in self._waiting} | set(self._copies)
        self._finished_ids |= {r for r in finished_req_ids if r in tracked}
        self._start_copies()
        done = {
            r for r in self._finished_ids if r in self._copies and (self._copies[r] is None or self._copies[r].done())
        }
        for r in done:
            del self._copies[r]
        self._finished_ids -= done
        return done or None, None

    def _start_copies(self) -> None:
        if not self._waiting:
            return
        assert self._sender is not None and self._cache_NLBH is not None, "register_kv_caches was not called"
        itemsize = self._cache_NLBH.element_size()
        while self._waiting:
            request = self._waiting[0]
            num_tokens = len(request.token_ids)
            nbytes = num_tokens * (len(self.layer_ids) * self.hidden_size * itemsize + 8)
            if not self._sender.has_room(nbytes):
                return  # its blocks stay held; try again next step
            self._waiting.popleft()
            try:
                copy = self._copier.copy(self._cache_NLBH, request.block_ids, num_tokens)
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the engine
                self._sender.fail(request.route, f"copy out of the hidden-state cache failed: {type(e).__name__}: {e}")
                self._copies[request.req_id] = None
                continue
            token_ids = torch.tensor(request.token_ids, dtype=torch.int64)
            self._sender.submit(SendJob(route=request.route, token_ids=token_ids, copy=copy))
            self._copies[request.req_id] = copy

    def shutdown(self) -> None:
        if self._sender is not None:
            self._sender.close()
