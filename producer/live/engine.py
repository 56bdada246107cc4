"""Talk to the running vLLM server that serves the draft: swap drafts, read its counters.

The server runs with ``--worker-extension-cls producer.live.swap.DraftSwap`` and
``VLLM_SERVER_DEV_MODE=1``, which adds ``POST /collective_rpc``; draftstream binds it to loopback
and only its own front door faces users, so that endpoint is never public.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request

SWAP_METHOD = "draftstream_swap_draft"
SERVING_METHOD = "draftstream_serving_draft"


@dataclasses.dataclass
class SpecCounters:
    """vLLM's speculative-decoding counters (cumulative since the engine started)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    per_pos: list[int] = dataclasses.field(default_factory=list)

    def __sub__(self, other: SpecCounters) -> SpecCounters:
        positions = max(len(self.per_pos), len(other.per_pos))
        mine = self.per_pos + [0] * (positions - len(self.per_pos))
        theirs = other.per_pos + [0] * (positions - len(other.per_pos))
        return SpecCounters(
            num_drafts=self.num_drafts - other.num_drafts,
            num_draft_tokens=self.num_draft_tokens - other.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens - other.num_accepted_tokens,
            per_pos=[a - b for a, b in zip(mine, theirs)],
        )

    @property
    def acceptance_length(self) -> float:
        """1 + accepted tokens per draft: the mean tokens a target step yields (vLLM's own formula)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else float("nan")

    @property
    def per_pos_rates(self) -> list[float]:
        return [n / self.num_drafts if self.num_drafts else float("nan") for n in self.per_pos]


def parse_spec_counters(metrics_text: str) -> SpecCounters:
    """The ``vllm:spec_decode_*_total`` samples of a Prometheus ``/metrics`` page, summed over label
    sets (engines, models) but kept apart by position."""
    counters = SpecCounters()
    per_pos: dict[int, int] = {}
    for line in metrics_text.splitlines():
        if not line.startswith("vllm:spec_decode_") or "_total" not in line:
            continue
        name_labels, value = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0].removeprefix("vllm:spec_decode_").removesuffix("_total")
        if name == "num_accepted_tokens_per_pos":
            position = int(name_labels.split('position="', 1)[1].split('"', 1)[0])
            per_pos[position] = per_pos.get(position, 0) + int(float(value))
        elif name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            setattr(counters, name, getattr(counters, name) + int(float(value)))
    counters.per_pos = [per_pos.get(p, 0) for p in range(max(per_pos, default=-1) + 1)]
    return counters


class EngineError(RuntimeError):
    """The serving engine did not answer as expected."""


class ServingEngine:
    """HTTP client of one vLLM server (its loopback address, e.g. ``http://127.0.0.1:8100``)."""

    def __init__(self, url: str, *, timeout: float = 120.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _call(self, path: str, body: dict | None = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            raise EngineError(f"{path}: HTTP {e.code}: {e.read()[:500]!r}") from e
        except OSError as e:
            raise EngineError(f"{path}: {e}") from e

    def _rpc(self, method: str, *args: str) -> list:
        answer = json.loads(self._call("/collective_rpc", {"method": method, "args": list(args)}))
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list) or not results:
            raise EngineError(f"/collective_rpc {method}: unexpected answer {answer!r:.300}")
        return results

    def swap(self, checkpoint: str) -> dict:
        """Load ``checkpoint`` into the serving draft on every worker: ``{"ok": bool, ...}`` (the
        first refusal if any worker refused; see ``DraftSwap.draftstream_swap_draft``)."""
        results = self._rpc(SWAP_METHOD, str(checkpoint))
        refused = [r for r in results if not (isinstance(r, dict) and r.get("ok"))]
        return refused[0] if refused else results[0]

    def serving(self) -> str:
        """The checkpoint the serving draft was last loaded from."""
        return str(self._rpc(SERVING_METHOD)[0])

    def counters(self) -> SpecCounters:
        return parse_spec_counters(self._call("/metrics").decode())

    def healthy(self) -> bool:
        try:
            self._call("/health")
            return True
        except EngineError:
            return False
