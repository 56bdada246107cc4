"""Issue 13 soak: every row's hostile peer at once, against one real trainer rank and producer.

Client threads attack the rank's ipc sockets for the whole run, each bounded in messages and
seconds (``run_mixed_load`` in hostile.py): absurd shapes on both sockets (row 1), identity theft
(2), oversized messages (3: frames above the frame cap and a flood of 8 MiB messages), NaN and
all-zero forged samples (4, 5), twenty idle fake producers (6), hostile hellos (7), an Error flood
(8), unneeded samples (9) and lease sabotage (10). The run must still finish with the planned
record, the baseline's losses, and a bounded RSS; the figures are printed.

The run is shared (``shared_mixed_load``): row 6 of test_hostile_peers.py (idle producers with
--lease-seconds 6, the soak's setting) asserts its own promise on it too.
"""

from __future__ import annotations

import pytest

from tests.trainer.stream.hostile import (
    BUFFER_BYTES,
    GiB,
    assert_unaffected,
    fmt_mib,
    forged_lines,
    shared_baseline,
    shared_mixed_load,
    shared_workload,
)

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


@pytest.fixture(scope="module")
def workload(tiny_llama, conversations_jsonl, tmp_path_factory):
    return shared_workload(tmp_path_factory, tiny_llama, conversations_jsonl)


@pytest.fixture(scope="module")
def baseline(workload, tmp_path_factory):
    return shared_baseline(tmp_path_factory, workload)


@pytest.mark.timeout(300)
def test_mixed_hostile_load_leaves_training_unaffected(workload, baseline, tmp_path_factory):
    result, figures = shared_mixed_load(tmp_path_factory, workload, baseline)
    bound = baseline.rss_peak + BUFFER_BYTES + GiB
    mentions, starts = forged_lines(result.log)
    print(
        f"\nsoak: wall {result.wall_s:.1f} s vs baseline {baseline.wall_s:.1f} s; "
        f"trainer peak RSS {fmt_mib(result.rss_peak)} (bound {fmt_mib(bound)}, baseline {fmt_mib(baseline.rss_peak)}); "
        f"{len(mentions)} log lines mention the forged text, {len(starts)} forged line starts"
    )
    for name in sorted(figures):
        print(f"  row {name}: {figures[name]}")
    assert_unaffected(result, baseline, workload, what="soak", rss_bound=bound)
    assert not starts, f"soak: forged log lines reached the trainer's log, e.g. {starts[0][:120]!r}"
