"""Issue 13 soak: every row's hostile peer at once, against one real trainer rank and producer.

Ten client threads attack the rank's ipc sockets for the whole run, each bounded in messages and
seconds: absurd shapes on both sockets (row 1), identity theft (2), oversized messages (3: frames
above the frame cap and a flood of 8 MiB messages), NaN and all-zero forged samples (4, 5), ten
idle fake producers (6), hostile hellos (7), an Error flood (8), unneeded samples (9) and lease
sabotage (10). The run must still finish with the planned record, the baseline's losses, and a
bounded RSS; the figures are printed.
"""

from __future__ import annotations

import time

import pytest

from tests.trainer.stream.hostile import (
    BUFFER_BYTES,
    PRODUCER_ID,
    Attacks,
    GiB,
    MiB,
    TrainingRun,
    assert_unaffected,
    fail_others_leases,
    fake_producers,
    flood_errors,
    fmt_mib,
    forged_lines,
    forged_sample_maker,
    oversized_messages,
    probe_handshakes,
    push_samples,
    send_absurd_shapes,
    shared_baseline,
    shared_workload,
    steal_identity,
    unneeded_sample_maker,
)

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


@pytest.fixture(scope="module")
def workload(tiny_llama, conversations_jsonl, tmp_path_factory):
    return shared_workload(tmp_path_factory, tiny_llama, conversations_jsonl)


@pytest.fixture(scope="module")
def baseline(workload, tmp_path_factory):
    return shared_baseline(tmp_path_factory, workload)


@pytest.mark.timeout(300)
def test_mixed_hostile_load_leaves_training_unaffected(workload, baseline, tmp_path):
    limit = 1.5 * max(baseline.wall_s, 30.0) + 100  # the harness kills a run that stalls past this
    with TrainingRun(
        workload, tmp_path, start_producer=False, train_args=["--lease-seconds", "6"], timeout=limit
    ) as run:
        assert run.wait_until_training(), run.log()[-3000:]
        stop = run.finished
        attacks = Attacks()
        attacks.start("6 idle producers", lambda: fake_producers(run, workload, count=10, stop=stop, limit=120))
        nan = forged_sample_maker(workload, fills=["nan"], lease_ids=range(1, 33))
        zero = forged_sample_maker(workload, fills=["zero"], lease_ids=[10**9])
        unneeded = unneeded_sample_maker(workload)
        attacks.start("4 nan samples", lambda: push_samples(run, nan, stop=stop, limit=600, seconds=60, rate=60))
        attacks.start("5 zero samples", lambda: push_samples(run, zero, stop=stop, limit=600, seconds=60, rate=60))
        attacks.start("9 unneeded", lambda: push_samples(run, unneeded, stop=stop, limit=1000, seconds=60, rate=100))
        time.sleep(1.0)
        run.start_producer()
        attacks.start("1 absurd shapes", lambda: send_absurd_shapes(run, stop=stop))
        attacks.start("3 40 x 60 MiB", lambda: oversized_messages(run, frames=40, frame_bytes=60 * MiB, count=2))
        attacks.start("3 100 x (4 x 2 MiB)", lambda: oversized_messages(run, frames=4, frame_bytes=2 * MiB, count=100))
        attacks.start("7 hostile hellos", lambda: probe_handshakes(run, workload))
        attacks.start("8 error flood", lambda: flood_errors(run, workload, count=3000, stop=stop, seconds=60))
        attacks.start("10 lease sabotage", lambda: fail_others_leases(run, workload, stop=stop, seconds=60))
        attacks.start("2 identity theft", lambda: steal_identity(run, PRODUCER_ID.encode(), stop=stop, limit=60))
        result = run.wait()
        figures = attacks.join(timeout=60)
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
