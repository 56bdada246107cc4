"""The checkpoint vLLM serves: config.json schema, weight names/shapes/dtypes, exact reload, and
reading the verifier's head without loading the verifier."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.trainer.tiny_capture import capture_samples
from trainer.data.batch import pack
from trainer.models.config import DraftConfig
from trainer.models.export import build_draft, export_state_dict, load_draft, save_draft
from trainer.models.vocab import build_vocab_mapping

AUX = [2, 2, 1]


pytestmark = pytest.mark.usefixtures("one_thread")


SPEC_KEYS = {
    "speculators_model_type",
    "architectures",
    "transformer_layer_config",
    "draft_vocab_size",
    "norm_before_residual",
    "norm_before_fc",
    "fc_norm",
    "norm_output",
    "target_hidden_size",
    "eagle_aux_hidden_state_layer_ids",
    "embed_requires_grad",
    "speculators_config",
    "speculators_version",
    "dtype",
    "tie_word_embeddings",
}


def _verifier_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _token_freq(vocab: int) -> dict[int, int]:
    return {i: (i * 31) % 97 for i in range(0, vocab, 2)}


def _build(verifier, speculator_type, **kw):
    vocab = _verifier_config(verifier)["vocab_size"]
    config = DraftConfig(speculator_type=speculator_type, verifier_name_or_path=str(verifier), aux_layer_ids=AUX, **kw)
    torch.manual_seed(0)
    return build_draft(config, _token_freq(vocab))


def _read_checkpoint(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((directory / "config.json").read_text())
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return config, tensors


def test_eagle3_config_json_has_every_spec_key_with_its_value(tiny_llama, tmp_path):
    verifier = _verifier_config(tiny_llama)
    model = _build(tiny_llama, "eagle3", draft_vocab_size=128, ttt_steps=4, num_layers=2)
    save_draft(model, tmp_path)
    config, _ = _read_checkpoint(tmp_path)

    assert SPEC_KEYS <= config.keys()
    assert "mask_token_id" not in config
    assert config["speculators_model_type"] == "eagle3"
    assert config["architectures"] == ["Eagle3Speculator"]
    assert config["draft_vocab_size"] == 128
    assert config["norm_before_residual"] is True
    assert config["norm_before_fc"] is True  # the single input_norm over the concatenated aux states
    assert config["fc_norm"] is False
    assert config["norm_output"] is False
    assert config["target_hidden_size"] == verifier["hidden_size"]
    assert config["eagle_aux_hidden_state_layer_ids"] == AUX
    assert config["embed_requires_grad"] is False
    assert config["dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is False
    assert isinstance(config["speculators_version"], str)
    assert config["speculators_config"] == {
        "algorithm": "eagle3",
        "proposal_methods": [
            {"proposal_type": "greedy", "speculative_tokens": 4, "verifier_accept_k": 1, "accept_tolerance": 0.0}
        ],
        "default_proposal_method": "greedy",
        "verifier": {"name_or_path": str(Path(tiny_llama).resolve()), "architectures": ["LlamaForCausalLM"]},
    }
    layer = config["transformer_layer_config"]
    assert layer["model_type"] == "llama"
    assert layer["vocab_size"] == verifier["vocab_size"]
    assert layer["num_hidden_layers"] == 2
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "max_position_embeddings",
    ):
        assert layer[key] == verifier[key], key
    assert layer["head_dim"] == verifier["hidden_size"] // verifier["num_attention_heads"]
    assert layer["rope_parameters"]["rope_theta"] == verifier["rope_parameters"]["rope_theta"]
    assert layer["tie_word_embeddings"] is False


def test_peagle_config_json_records_depths_and_the_mask_token(tiny_qwen3, tmp_path):
    verifier = _verifier_config(tiny_qwen3)
    model = _build(tiny_qwen3, "peagle", num_depths=6, norm_before_residual=False)
    save_draft(model, tmp_path)
    config, _ = _read_checkpoint(tmp_path)

    assert SPEC_KEYS | {"mask_token_id"} <= config.keys()
    assert config["speculators_model_type"] == "peagle"
    assert config["architectures"] == ["PEagleSpeculator"]
    assert config["draft_vocab_size"] == verifier["vocab_size"]
    assert config["norm_before_residual"] is False
    assert config["embed_requires_grad"] is True
    # The fixture tokenizer has no mask token and no spare embedding row: the pad token is used.
    assert config["mask_token_id"] == verifier["pad_token_id"]
    assert config["speculators_config"]["algorithm"] == "peagle"
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 6
    assert config["speculators_config"]["verifier"]["architectures"] == ["Qwen3ForCausalLM"]
    assert config["transformer_layer_config"]["model_type"] == "qwen3"


def test_an_explicit_mask_token_id_is_kept(tiny_qwen3, tmp_path):
    model = _build(tiny_qwen3, "peagle", mask_token_id=3)
    save_draft(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["mask_token_id"] == 3


def _expected_weights(hidden, inter, heads, kv_heads, head_dim, num_layers, vocab, draft_vocab, qwen3):
    a = len(AUX)
    shapes = {
        "embed_tokens.weight": (vocab, hidden),
        "input_norm.weight": (a * hidden,),
        "fc.weight": (hidden, a * hidden),
        "norm.weight": (hidden,),
        "lm_head.weight": (draft_vocab, hidden),
        "layers.0.hidden_norm.weight": (hidden,),
    }
    for i in range(num_layers):
        width = 2 * hidden if i == 0 else hidden
        p = f"layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (heads * head_dim, width),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, width),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, width),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
        if qwen3:
            shapes |= {p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,)}
    return shapes


@pytest.mark.parametrize(
    ("fixture", "speculator_type", "draft_vocab_size"),
    [("tiny_llama", "eagle3", 128), ("tiny_qwen3", "peagle", 200), ("tiny_llama", "peagle", None)],
)
def test_weights_carry_spec_names_shapes_and_dtypes(request, tmp_path, fixture, speculator_type, draft_vocab_size):
    verifier_dir = request.getfixturevalue(fixture)
    v = _verifier_config(verifier_dir)
    model = _build(verifier_dir, speculator_type, draft_vocab_size=draft_vocab_size, num_layers=2)
    save_draft(model, tmp_path)
    _, tensors = _read_checkpoint(tmp_path)

    vocab = v["vocab_size"]
    draft_vocab = draft_vocab_size or vocab
    head_dim = v.get("head_dim") or v["hidden_size"] // v["num_attention_heads"]
    expected = _expected_weights(
        v["hidden_size"],
        v["intermediate_size"],
        v["num_attention_heads"],
        v["num_key_value_heads"],
        head_dim,
        2,
        vocab,
        draft_vocab,
        fixture == "tiny_qwen3",
    )
    if draft_vocab < vocab:
        expected |= {"d2t": (draft_vocab,), "t2d": (vocab,)}
    if speculator_type == "peagle":
        expected["mask_hidden"] = (1, 1, len(AUX) * v["hidden_size"])
    assert {n: tuple(t.shape) for n, t in tensors.items()} == expected
    for name, tensor in tensors.items():
        want = {"d2t": torch.int64, "t2d": torch.bool}.get(name, torch.bfloat16)
        assert tensor.dtype == want, name
    if draft_vocab < vocab:
        d2t, t2d = build_vocab_mapping(_token_freq(vocab), draft_vocab, vocab)
        assert torch.equal(tensors["d2t"], d2t) and torch.equal(tensors["t2d"], t2d)


def _round_to_bf16(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("verifier_"):  # never saved: reloaded from the verifier as is
                p.copy_(p.to(torch.bfloat16).float())
    return model


@pytest.mark.parametrize("speculator_type", ["eagle3", "peagle"])
def test_a_saved_checkpoint_reloads_into_identical_outputs(tiny_llama, tmp_path, speculator_type):
    batch = pack(capture_samples(tiny_llama, 2, max_len=40), 512, pad_to=96)
    # Checkpoints are bf16: start from bf16-representable weights so "identical" is exact.
    model = _round_to_bf16(_build(tiny_llama, speculator_type, draft_vocab_size=300, num_depths=4, num_layers=2))
    save_draft(model, tmp_path / "ckpt")
    reloaded = load_draft(tmp_path / "ckpt")

    assert type(reloaded) is type(model)
    # config.json records the algorithm's own K only (ttt_steps or num_depths).
    other_k = "num_depths" if speculator_type == "eagle3" else "ttt_steps"
    assert dataclasses.replace(reloaded.config, **{other_k: getattr(model.config, other_k)}) == model.config
    own, back = model.state_dict(), reloaded.state_dict()
    assert own.keys() == back.keys()
    for name in own:
        assert torch.equal(own[name], back[name]), name
    first = model(batch, generator=torch.Generator().manual_seed(1))
    again = reloaded(batch, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first.loss, again.loss)
    assert first.metrics.keys() == again.metrics.keys()
    assert all(torch.equal(first.metrics[k], again.metrics[k]) for k in first.metrics)


def test_save_accepts_a_gathered_state_dict(tiny_llama, tmp_path):
    model = _build(tiny_llama, "peagle")
    full = {name: t.clone() for name, t in model.state_dict().items()}
    full["fc.weight"].add_(1.0)
    save_draft(model, tmp_path, state_dict=full)
    _, tensors = _read_checkpoint(tmp_path)
    assert torch.equal(tensors["fc.weight"], full["fc.weight"].to(torch.bfloat16))
    assert tensors.keys() == export_state_dict(model).keys()
    assert not any(name.startswith("verifier_") for name in tensors)


def test_load_takes_a_new_verifier_path_and_training_overrides(tiny_llama, tmp_path):
    model = _build(tiny_llama, "eagle3")
    save_draft(model, tmp_path)
    reloaded = load_draft(tmp_path, verifier_name_or_path=str(tiny_llama), ttt_step_loss_decay=0.8)
    assert reloaded.config.verifier_name_or_path == str(tiny_llama)
    assert reloaded.config.ttt_step_loss_decay == 0.8
    assert torch.equal(reloaded.verifier_norm.weight, model.verifier_norm.weight)


def test_a_checkpoint_that_lacks_tensors_is_refused(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    model = _build(tiny_llama, "eagle3")
    save_draft(model, tmp_path)
    _, tensors = _read_checkpoint(tmp_path)
    del tensors["fc.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="fc.weight"):
        load_draft(tmp_path)


def test_verifier_head_is_read_from_sharded_safetensors_without_loading_the_rest(tiny_llama, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(tiny_llama)).save_pretrained(str(sharded), max_shard_size="200KB")
    (sharded / "config.json").write_text((tiny_llama / "config.json").read_text())
    assert (sharded / "model.safetensors.index.json").is_file()

    import trainer.models.verifier as verifier_module

    read: list[str] = []
    real_safe_open = verifier_module.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.inner = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self.handle.get_tensor(name)

        def keys(self):
            return self.handle.keys()

    monkeypatch.setattr(verifier_module, "safe_open", Spy)
    from_shards = _build(sharded, "eagle3")
    assert sorted(read) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    monkeypatch.undo()
    single = _build(tiny_llama, "eagle3")
    for name in ("embed_tokens.weight", "lm_head.weight", "verifier_lm_head.weight", "verifier_norm.weight"):
        assert torch.equal(from_shards.state_dict()[name], single.state_dict()[name]), name


def test_checkpoint_names_map_onto_vllm_eagle3_parameters(tiny_llama, tmp_path):
    """vLLM's Eagle-3 loader (0.33, llama_eagle3.py): t2d is skipped, d2t becomes
    draft_id_to_target_id, mask_hidden fills a buffer, every other name but lm_head gains a
    ``model.`` prefix, q/k/v and gate/up stack into qkv_proj / gate_up_proj; input_norm is
    consumed when config.json says norm_before_fc. Check our names land on its parameters."""
    model = _build(tiny_llama, "peagle", draft_vocab_size=128, num_layers=2)
    save_draft(model, tmp_path)
    config, tensors = _read_checkpoint(tmp_path)

    vllm_params = {
        "lm_head.weight",
        "draft_id_to_target_id",
        "model.embed_tokens.weight",
        "model.fc.weight",
        "model.norm.weight",
    }
    if config["norm_before_fc"]:
        vllm_params.add("model.input_norm.weight")
    for i in range(config["transformer_layer_config"]["num_hidden_layers"]):
        p = f"model.layers.{i}."
        vllm_params |= {
            p + s
            for s in (
                "self_attn.qkv_proj.weight",
                "self_attn.o_proj.weight",
                "mlp.gate_up_proj.weight",
                "mlp.down_proj.weight",
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
                "hidden_norm.weight",
            )
        }
    stacked = {
        ".q_proj": ".qkv_proj",
        ".k_proj": ".qkv_proj",
        ".v_proj": ".qkv_proj",
        ".gate_proj": ".gate_up_proj",
        ".up_proj": ".gate_up_proj",
    }
    mapped = set()
    for name in tensors:
        if name in ("t2d", "mask_hidden"):
            continue
        if name == "d2t":
            mapped.add("draft_id_to_target_id")
            continue
        name = name if name.startswith("lm_head") else "model." + name
        for old, new in stacked.items():
            name = name.replace(old, new)
        mapped.add(name)
    assert mapped <= vllm_params, mapped - vllm_params
    # vLLM creates hidden_norm in every layer but only layer 0 uses (and loads) it.
    assert vllm_params - mapped == {f"model.layers.{i}.hidden_norm.weight" for i in range(1, 2)}
    assert tensors["mask_hidden"].numel() == len(AUX) * config["target_hidden_size"]  # viewed as [1, A*H]
    assert isinstance(config["mask_token_id"], int)  # update_peagle reads config_dict["mask_token_id"]


def test_a_hub_verifier_fetches_only_config_index_and_the_shards_it_needs(tmp_path):
    """Hub ids resolve through the cache, downloading config.json, the index and only the shards
    that hold embeddings, norm and lm_head (a fake downloader stands in for the hub)."""
    import json as _json

    from trainer.models.verifier import resolve_verifier_dir

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    weight_map = {
        "model.embed_tokens.weight": "model-00001.safetensors",
        "model.layers.0.mlp.up_proj.weight": "model-00002.safetensors",
        "model.norm.weight": "model-00003.safetensors",
        "lm_head.weight": "model-00003.safetensors",
    }
    remote = {"config.json": "{}", "model.safetensors.index.json": _json.dumps({"weight_map": weight_map})}
    fetched = []

    def download(repo, filename):
        assert repo == "org/verifier"
        fetched.append(filename)
        (snapshot / filename).write_text(remote.get(filename, "shard"))
        return str(snapshot / filename)

    assert resolve_verifier_dir("org/verifier", download=download) == snapshot
    assert fetched == [
        "config.json",
        "model.safetensors.index.json",
        "model-00001.safetensors",
        "model-00003.safetensors",
    ]

    def offline(repo, filename):
        raise OSError("no network")

    with pytest.raises(ValueError, match="not a local directory"):
        resolve_verifier_dir("org/other", download=offline)
