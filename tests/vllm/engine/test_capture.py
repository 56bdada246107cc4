"""vLLM's captures equal the HF backend's on the same rows, in the real engine on CPU.

vLLM side: ``draftstream produce --backend vllm --spill DIR --validate`` (``extract_hidden_states`` +
our connector writing ``hs_{i}.safetensors``), one engine per (arch, dtype), two runs at a time. HF
side: ``HFCapture``, the backend of ``produce --spill``. Per captured layer slot, the relative error
``||v - h|| / ||h||`` is taken over all tokens of all rows (and, for fp32, also per row):

- fp32: token ids exact, every slot below 1e-4 (seen: about 1e-6);
- bf16: vLLM in bf16 is no further from HF fp32 than HF's own bf16 capture is (factor 1.25), per slot.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

import torch  # noqa: E402

from protocol.dataset import PreparedDataset  # noqa: E402
from protocol.hsfile import hs_path, list_hs_indices, read_hs_file  # noqa: E402
from tests.vllm.engine.conftest import FIGURES, NUM_ROWS  # noqa: E402

FP32_TOLERANCE = 1e-4
BF16_FACTOR = 1.25
LAYER_IDS = [2, 4, 5, 8]  # the default capture of the 8-layer tiny target


def read_spill(directory, data: PreparedDataset, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """Every row's file: token ids exactly the row's, hidden states [T, 4, 64] in ``dtype``."""
    assert list_hs_indices(directory) == list(range(NUM_ROWS))
    out = {}
    for i in range(NUM_ROWS):
        input_ids, _ = data.row(i)
        token_ids, hidden_TLH = read_hs_file(hs_path(directory, i))
        assert torch.equal(token_ids, input_ids.to(torch.int64)), f"row {i}: token ids differ"
        assert hidden_TLH.dtype == dtype and tuple(hidden_TLH.shape) == (len(input_ids), len(LAYER_IDS), 64)
        out[i] = hidden_TLH
    return out


def slot_errors(got: dict[int, torch.Tensor], ref: dict[int, torch.Tensor]) -> list[float]:
    """Per layer slot, ``||got - ref|| / ||ref||`` over all tokens of all rows (in fp32)."""
    g = torch.cat([got[i].float() for i in sorted(ref)])
    r = torch.cat([ref[i].float() for i in sorted(ref)])
    return [float((g[:, s] - r[:, s]).norm() / r[:, s].norm()) for s in range(r.shape[1])]


def worst_row_errors(got: dict[int, torch.Tensor], ref: dict[int, torch.Tensor]) -> list[float]:
    """Per layer slot, the largest per-row relative error."""
    per_row = [slot_errors({i: got[i]}, {i: ref[i]}) for i in sorted(ref)]
    return [max(row[s] for row in per_row) for s in range(len(per_row[0]))]


def fmt(errors: list[float]) -> str:
    return "[" + ", ".join(f"{e:.2e}" for e in errors) + "]"


DTYPE_OF_TEST = {  # the spill dtype each test of this module reads, for every arch it is run with
    "test_fp32_captures_equal_the_hf_backend": "float32",
    "test_bf16_captures_are_no_further_from_fp32_than_hf_bf16": "bfloat16",
}


@pytest.fixture(scope="module", autouse=True)
def spills_ahead(request, vllm_spills):
    """Start the spills the selected tests of this module read, in their order, two at a time: one
    engine starts up while another does (``SpillRuns``), and the HF captures run beside them."""
    vllm_spills.start(
        *(
            (item.callspec.params["arch"], DTYPE_OF_TEST[item.originalname])
            for item in request.session.items
            if getattr(item, "module", None) is request.module and getattr(item, "originalname", None) in DTYPE_OF_TEST
        )
    )


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fp32_captures_equal_the_hf_backend(arch, workloads, vllm_spills, hf_captures):
    workload = workloads(arch)
    data = PreparedDataset(str(workload.data))
    ref = hf_captures(arch, "float32")  # while the spill runs
    run = vllm_spills(arch, "float32")
    assert f"written                {NUM_ROWS}" in run.stdout
    assert f"validated              {NUM_ROWS} ok, 0 missing, 0 bad" in run.stdout
    got = read_spill(run.directory, data, torch.float32)
    errors, worst = slot_errors(got, ref), worst_row_errors(got, ref)
    FIGURES.append(f"{arch} fp32: vLLM vs HF fp32 per slot {LAYER_IDS}: {fmt(errors)}, worst row {fmt(worst)}")
    assert max(worst) < FP32_TOLERANCE, (errors, worst)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bf16_captures_are_no_further_from_fp32_than_hf_bf16(arch, workloads, vllm_spills, hf_captures):
    workload = workloads(arch)
    data = PreparedDataset(str(workload.data))
    ref, hf_bf16 = hf_captures(arch, "float32"), hf_captures(arch, "bfloat16")  # while the spill runs
    run = vllm_spills(arch, "bfloat16")
    got = read_spill(run.directory, data, torch.bfloat16)
    vllm_errors, hf_errors = slot_errors(got, ref), slot_errors(hf_bf16, ref)
    FIGURES.append(
        f"{arch} bf16: vLLM bf16 vs HF fp32 {fmt(vllm_errors)}; HF bf16 vs HF fp32 {fmt(hf_errors)}; "
        f"vLLM bf16 vs HF bf16 {fmt(slot_errors(got, hf_bf16))}"
    )
    for slot, (v, h) in enumerate(zip(vllm_errors, hf_errors)):
        assert v <= BF16_FACTOR * h, f"slot {slot} (layer {LAYER_IDS[slot]}): vLLM bf16 {v:.3e} vs HF bf16 {h:.3e}"
    assert 1e-3 < max(hf_errors) < 0.1  # bf16 rounding, not a broken capture on either side
