"""``produce --backend vllm``'s requests, checked against vLLM 0.33's own classes on CPU: the
completions body the --endpoint client posts, and the arguments the in-process engine gets. Running
them (a server, ``vllm.LLM``) needs a GPU."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from producer.vllm.backend import HTTPEngine, InProcessEngine  # noqa: E402
from producer.vllm.params import SampleRoute  # noqa: E402
from tests.vllm.conftest import LAYER_IDS  # noqa: E402

ROUTE = SampleRoute(
    sample_id=5,
    epoch=1,
    lease_id=2,
    destination="tcp://10.0.0.2:5601",
    num_tokens=4,
    loss_mask_spans=[[2, 4]],
    report="ipc:///tmp/r",
    ticket=3,
)


def test_completions_body_is_a_vllm_completion_request_carrying_our_params():
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    body = HTTPEngine.completion_body("tiny", [11, 12, 13, 14], ROUTE.to_params())
    request = CompletionRequest(**body)
    assert request.prompt == [11, 12, 13, 14]  # token ids, not text: no tokenizer in between
    assert request.return_token_ids is True
    sampling = request.to_sampling_params(max_tokens=1)
    assert sampling.max_tokens == 1
    assert SampleRoute.from_params(sampling.extra_args["kv_transfer_params"]) == ROUTE


def test_in_process_engine_arguments_build_a_vllm_engine_config_on_cpu(tiny_qwen3, spill_root):
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    kwargs = InProcessEngine.llm_kwargs(
        str(tiny_qwen3),
        layer_ids=LAYER_IDS,
        dtype="bfloat16",
        engine_args={"max_model_len": 256},
        connector_extra={"spill_dirs": [str(spill_root)]},
    )
    kwargs["kv_transfer_config"] = KVTransferConfig(**kwargs["kv_transfer_config"])  # what vllm.LLM does with the dict
    config = EngineArgs(**kwargs).create_engine_config()
    assert config.speculative_config.method == "extract_hidden_states"
    assert list(config.speculative_config.draft_model_config.hf_config.eagle_aux_hidden_state_layer_ids) == LAYER_IDS
    assert config.kv_transfer_config.kv_connector_module_path == "producer.vllm.connector"
    assert config.model_config.max_model_len == 256
    with pytest.raises(ValueError, match="may not set speculative_config"):
        InProcessEngine.llm_kwargs(
            str(tiny_qwen3),
            layer_ids=LAYER_IDS,
            dtype="bfloat16",
            engine_args={"speculative_config": {}},
            connector_extra={},
        )
