"""DraftstreamConnector against vLLM 0.33's own classes, on CPU.

The scheduler side runs inside vLLM's real ``Scheduler`` (requests added, scheduled, finished with a
fake model output, blocks held and freed by vLLM's bookkeeping). The worker side gets a CPU tensor
in the hidden-state cache layout, written with vLLM's own ``basic_cache`` (what the cache-only layer
does on the GPU), registered through a real ``CacheOnlyAttentionLayer``; its samples go to real
ZeroMQ sockets and files. What this cannot show: the GPU copy stream and pinned memory (the CPU
fallback runs here), and a real forward filling the cache.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import torch  # noqa: E402
import zmq  # noqa: E402

from producer.vllm.params import PARAMS_KEY, SampleRoute, loss_mask_spans  # noqa: E402
from protocol.hsfile import hs_path, read_hs_file  # noqa: E402
from protocol.messages import Delivered, Sample  # noqa: E402
from protocol.sockets import SocketConfig, make_socket, recv_message  # noqa: E402
from tests.vllm.conftest import LAYER_IDS, NUM_BLOCKS  # noqa: E402

HIDDEN = 64  # the tiny target's hidden size
ATTN_LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(8)]
CACHE_LAYER = "draftstream_test.cache_only_layers.8"


@pytest.fixture(scope="module")
def kv_cache_config(vllm_config):
    """Two KV-cache groups as vLLM forms them for extract_hidden_states: the target's attention
    layers, and the hidden-state layer (``HiddenStateCacheSpec``: one head per captured layer)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, HiddenStateCacheSpec, KVCacheConfig, KVCacheGroupSpec

    block_size = vllm_config.cache_config.block_size
    dtype = vllm_config.model_config.dtype
    attention = FullAttentionSpec(block_size=block_size, num_kv_heads=2, head_size=16, dtype=dtype)
    hidden = HiddenStateCacheSpec(block_size=block_size, num_kv_heads=len(LAYER_IDS), head_size=HIDDEN, dtype=dtype)
    return KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(ATTN_LAYERS, attention), KVCacheGroupSpec([CACHE_LAYER], hidden)],
    )


@pytest.fixture
def scheduler(vllm_config, kv_cache_config):
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    return Scheduler(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=vllm_config.cache_config.block_size,
        log_stats=False,
    )


@pytest.fixture(scope="module")
def cache_layer(vllm_config):
    """A real CacheOnlyAttentionLayer, registered in the config's forward context (as at model load)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.models.extract_hidden_states import CacheOnlyAttentionLayer

    with set_current_vllm_config(vllm_config):
        return CacheOnlyAttentionLayer(num_heads=len(LAYER_IDS), head_size=HIDDEN, prefix=CACHE_LAYER)


@pytest.fixture
def worker(vllm_config, kv_cache_config, cache_layer, monkeypatch):
    """The worker-side connector, made by vLLM's factory, holding a zeroed CPU hidden-state cache."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1 import KVConnectorRole

    import producer.vllm.connector as module

    monkeypatch.setattr(module, "get_tensor_model_parallel_rank", lambda: 0)  # no process group on CPU
    connector = KVConnectorFactory.create_connector(vllm_config, KVConnectorRole.WORKER, kv_cache_config)
    block_size = vllm_config.cache_config.block_size
    cache_NLBH = torch.zeros((NUM_BLOCKS, len(LAYER_IDS), block_size, HIDDEN), dtype=vllm_config.model_config.dtype)
    connector.register_kv_caches({ATTN_LAYERS[0]: torch.zeros(1), CACHE_LAYER: cache_NLBH})
    yield connector
    connector.shutdown()


def make_request(request_id: str, prompt: list[int], route: SampleRoute | None, params: dict | None = None):
    """A vLLM Request as the engine makes it from produce's in-process SamplingParams."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    from producer.vllm.engines import InProcessEngine

    kv = route.to_params() if route is not None else params
    sampling = InProcessEngine.sampling_params(kv) if kv is not None else SamplingParams(max_tokens=1)
    return Request(request_id=request_id, prompt_token_ids=prompt, sampling_params=sampling, pooling_params=None)


def run_to_finish(scheduler, requests) -> tuple[dict[str, dict | None], object]:
    """Schedule the requests' prefills, finish them with one sampled token each (max_tokens=1);
    returns the kv_transfer_params vLLM hands back per request, and the next step's scheduler output."""
    from vllm.v1.outputs import ModelRunnerOutput

    for request in requests:
        scheduler.add_request(request)
    out = scheduler.schedule()
    ids = list(out.num_scheduled_tokens)
    result = scheduler.update_from_output(
        out,
        ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)}, sampled_token_ids=[[7] for _ in ids]
        ),
    )
    answers = {o.request_id: o.kv_transfer_params for outputs in result.values() for o in outputs.outputs}
    return answers, scheduler.schedule()


def release(scheduler, step_output, finished_sending: set[str]) -> None:
    """Hand the worker's "finished sending" back to vLLM, as the model runner output does."""
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    scheduler.update_from_output(
        step_output,
        ModelRunnerOutput(
            req_ids=[], req_id_to_index={}, kv_connector_output=KVConnectorOutput(finished_sending=finished_sending)
        ),
    )


def write_cache(cache_NLBH: torch.Tensor, block_ids: list[int], hidden_TLH: torch.Tensor) -> None:
    """Put a request's rows where vLLM's cache-only layer puts them: its own basic_cache over the
    slot mapping the model runner computes (block id * block size + offset)."""
    from vllm.model_executor.models.extract_hidden_states import basic_cache

    block_size = cache_NLBH.shape[2]
    slots = torch.tensor([block_ids[t // block_size] * block_size + t % block_size for t in range(hidden_TLH.shape[0])])
    basic_cache(hidden_TLH, cache_NLBH, slots)


def rows(seed: int, num_tokens: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((num_tokens, len(LAYER_IDS), HIDDEN), generator=generator).to(torch.bfloat16)


def route_for(
    sample_id: int, prompt: list[int], destination: str, *, mask: torch.Tensor | None = None, **kw
) -> SampleRoute:
    mask = mask if mask is not None else (torch.arange(len(prompt)) >= 2).to(torch.uint8)
    return SampleRoute(
        sample_id=sample_id,
        destination=destination,
        num_tokens=len(prompt),
        loss_mask_spans=loss_mask_spans(mask),
        **kw,
    )


# ---- loading and configuration -----------------------------------------------------------------


def test_connector_loads_through_vllms_factory_from_kv_connector_module_path(vllm_config):
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import supports_hma

    from producer.vllm.connector import DraftstreamConnector

    transfer = vllm_config.kv_transfer_config
    assert (transfer.kv_connector, transfer.kv_connector_module_path, transfer.kv_role) == (
        "DraftstreamConnector",
        "producer.vllm.connector",
        "kv_producer",
    )
    assert KVConnectorFactory.get_connector_class(transfer) is DraftstreamConnector
    assert supports_hma(DraftstreamConnector)  # vLLM refuses non-HMA connectors while HMA is on


def test_engine_config_with_launch_vllm_settings_builds_on_cpu(vllm_config, spill_root):
    spec = vllm_config.speculative_config
    assert spec.method == "extract_hidden_states"
    assert spec.num_speculative_tokens == 1
    assert list(spec.draft_model_config.hf_config.eagle_aux_hidden_state_layer_ids) == LAYER_IDS
    assert vllm_config.kv_transfer_config.kv_connector_extra_config == {"spill_dirs": [str(spill_root)]}
    assert vllm_config.model_config.dtype == torch.bfloat16


# ---- scheduler side -------------------------------------------------------------------------


def test_vllm_scheduler_keeps_blocks_until_the_worker_has_copied_them(scheduler):
    prompts = {"a": list(range(3, 8)), "b": list(range(3, 23)), "c": list(range(3, 36))}  # 1, 2 and 3 blocks
    requests = [
        make_request(r, p, route_for(10 + i, p, "ipc:///nowhere", epoch=2, lease_id=9))
        for i, (r, p) in enumerate(prompts.items())
    ]
    free_before = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    answers, step = run_to_finish(scheduler, requests)

    for i, (request_id, prompt) in enumerate(prompts.items()):
        assert answers[request_id] == {
            PARAMS_KEY: {
                "sample_id": 10 + i,
                "num_tokens": len(prompt),
                "layer_ids": LAYER_IDS,
                "hidden_size": HIDDEN,
                "dtype": "bfloat16",
            }
        }
    meta = step.kv_connector_metadata
    assert [f.req_id for f in meta.finished] == list(prompts)
    block_size = scheduler.block_size
    for i, (finished, prompt) in enumerate(zip(meta.finished, prompts.values())):
        assert finished.token_ids == prompt  # the request's prompt ids, as vLLM holds them
        assert (finished.route.sample_id, finished.route.epoch, finished.route.lease_id) == (10 + i, 2, 9)
        assert len(finished.block_ids) >= -(-len(prompt) // block_size)
    assert set(step.finished_req_ids) == set(prompts)
    assert len(scheduler.requests) == 3  # finished, but their blocks are still held for us
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() < free_before

    release(scheduler, step, set(prompts))
    assert len(scheduler.requests) == 0
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == free_before


def test_requests_without_draftstream_params_pass_through(scheduler):
    answers, step = run_to_finish(
        scheduler, [make_request("plain", [5, 6, 7], None), make_request("other", [5, 6], None, {"foo": 1})]
    )
    assert answers == {"plain": None, "other": None}
    assert step.kv_connector_metadata.finished == []
    assert len(scheduler.requests) == 0  # freed at once


def test_bad_params_or_wrong_prompt_are_answered_with_an_error_and_free_their_blocks(scheduler):
    prompt = [5, 6, 7, 8]
    bad_params = make_request(
        "bad", prompt, None, {PARAMS_KEY: {"sample_id": 1, "destination": "http://x", "num_tokens": 4}}
    )
    wrong_length = make_request("short", prompt, route_for(2, prompt + [9], "ipc:///nowhere"))
    answers, step = run_to_finish(scheduler, [bad_params, wrong_length])
    assert "destination must be" in answers["bad"][PARAMS_KEY]["error"]
    assert answers["short"][PARAMS_KEY] == {"sample_id": 2, "error": "the prompt has 4 tokens but the row has 5"}
    assert step.kv_connector_metadata.finished == []
    assert len(scheduler.requests) == 0


# ---- worker side ------------------------------------------------------------------------------


def test_worker_pushes_each_finished_request_as_one_sample_a_trainer_socket_decodes(scheduler, worker, tmp_path):
    ctx = zmq.Context()
    data_endpoint, report_endpoint = f"ipc://{tmp_path}/rank0-data.sock", f"ipc://{tmp_path}/report.sock"
    pull = make_socket(ctx, zmq.PULL, SocketConfig(rcvhwm=16), bind=data_endpoint)
    reports = make_socket(ctx, zmq.PULL, SocketConfig(rcvhwm=16), bind=report_endpoint)
    try:
        prompts = {"x": list(range(10, 50)), "y": list(range(100, 117))}
        masks = {"x": (torch.arange(40) % 3 == 0).to(torch.uint8), "y": torch.ones(17, dtype=torch.uint8)}
        requests = [
            make_request(
                r,
                p,
                route_for(
                    40 + i,
                    p,
                    data_endpoint,
                    mask=masks[r],
                    epoch=3,
                    lease_id=11,
                    report=report_endpoint,
                    ticket=500 + i,
                ),
            )
            for i, (r, p) in enumerate(prompts.items())
        ]
        _, step = run_to_finish(scheduler, requests)
        expected = {}
        for i, finished in enumerate(step.kv_connector_metadata.finished):
            expected[finished.req_id] = rows(i, len(finished.token_ids))
            write_cache(worker._cache_NLBH, finished.block_ids, expected[finished.req_id])

        worker.bind_connector_metadata(step.kv_connector_metadata)
        done, recving = worker.get_finished(set(step.finished_req_ids))
        worker.clear_connector_metadata()
        assert done == set(prompts) and recving is None  # CPU copies are done on return
        release(scheduler, step, done)
        assert len(scheduler.requests) == 0

        got = {}
        for _ in prompts:
            assert pull.poll(10_000), "no sample arrived"
            _, message = recv_message(pull)
            assert isinstance(message, Sample)
            got[message.sample_id] = message
        for i, request_id in enumerate(prompts):
            sample = got[40 + i]
            assert (sample.epoch, sample.lease_id) == (3, 11)
            assert sample.token_ids.tolist() == prompts[request_id]
            assert torch.equal(sample.loss_mask, masks[request_id])
            assert sample.hidden_states.dtype == torch.bfloat16
            assert torch.equal(sample.hidden_states, expected[request_id])
        tickets = set()
        for _ in prompts:
            assert reports.poll(10_000)
            _, report = recv_message(reports)
            assert isinstance(report, Delivered) and report.ok and report.reason == ""
            tickets.add(report.ticket)
        assert tickets == {500, 501}
    finally:
        pull.close(linger=0)
        reports.close(linger=0)
        ctx.term()


def test_spill_destination_writes_a_file_read_hs_file_accepts(scheduler, worker, spill_root):
    prompt = list(range(200, 237))
    directory = spill_root / "run1"
    _, step = run_to_finish(scheduler, [make_request("s", prompt, route_for(7, prompt, f"file://{directory}"))])
    (finished,) = step.kv_connector_metadata.finished
    expected = rows(3, len(prompt))
    write_cache(worker._cache_NLBH, finished.block_ids, expected)
    worker.bind_connector_metadata(step.kv_connector_metadata)
    assert worker.get_finished(set(step.finished_req_ids)) == ({"s"}, None)
    worker.shutdown()  # drains the sender: the file is complete after this
    token_ids, hidden_TLH = read_hs_file(hs_path(directory, 7), expected_token_ids=torch.tensor(prompt))
    assert token_ids.dtype == torch.int64 and torch.equal(hidden_TLH, expected)


def test_worker_holds_blocks_while_its_send_queue_is_full(scheduler, worker, spill_root, monkeypatch):
    prompt = list(range(3, 20))
    _, step = run_to_finish(scheduler, [make_request("q", prompt, route_for(1, prompt, f"file://{spill_root}/held"))])
    monkeypatch.setattr(worker._sender, "has_room", lambda nbytes: False)
    worker.bind_connector_metadata(step.kv_connector_metadata)
    assert worker.get_finished(set(step.finished_req_ids)) == (None, None)  # no copy, no release, no wait
    worker.clear_connector_metadata()
    monkeypatch.undo()
    worker.bind_connector_metadata(type(step.kv_connector_metadata)())  # a later step, nothing new
    assert worker.get_finished(set()) == ({"q"}, None)


def test_failures_are_reported_not_delivered_and_still_release_blocks(scheduler, worker, tmp_path):
    ctx = zmq.Context()
    report_endpoint = f"ipc://{tmp_path}/report.sock"
    reports = make_socket(ctx, zmq.PULL, SocketConfig(rcvhwm=16), bind=report_endpoint)
    try:
        prompt = list(range(3, 40))
        outside = route_for(5, prompt, f"file://{tmp_path}/not-allowed", report=report_endpoint, ticket=77)
        _, step = run_to_finish(scheduler, [make_request("f", prompt, outside)])
        worker.bind_connector_metadata(step.kv_connector_metadata)
        assert worker.get_finished(set(step.finished_req_ids)) == ({"f"}, None)
        assert reports.poll(10_000)
        _, report = recv_message(reports)
        assert isinstance(report, Delivered) and not report.ok
        assert (report.ticket, report.sample_id) == (77, 5)
        assert "spill_dirs" in report.reason
        assert not (tmp_path / "not-allowed").exists()
    finally:
        reports.close(linger=0)
        ctx.term()
