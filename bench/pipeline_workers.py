"""The pipeline benchmark's own worker processes (``bench.pipeline`` starts them; one each per mode):

- ``capture``: the producer alone, HFCapture (+ the codec's encode) over exactly the
  (epoch, row) keys the streaming run grants, in its grant order;
- ``memtrain``: the trainer alone, ``draftstream train`` unchanged except that its file source
  preloads every hidden-state file into memory before training (``trainer.train.main``'s
  ``make_file_source`` seam).

    python -m bench.pipeline_workers capture --model M --data D --keys K [--rank R --num-workers P]
    python -m bench.pipeline_workers memtrain <draftstream train flags>
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

CAPTURE_BATCH_TOKENS = 8192  # draftstream produce --max-batch-tokens default


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.pipeline_workers", *args]


def label(argv: list[str]) -> str | None:
    """Names for these workers (``bench.processes`` names the rest)."""
    if "bench.pipeline_workers" in argv:
        if "capture" in argv:
            i = argv.index("--rank") if "--rank" in argv else -1
            return f"capture-{argv[i + 1] if i >= 0 else 0}"
        if "memtrain" in argv:
            return "trainer"
    return None


def capture_worker(argv: list[str]) -> int:
    """Producer alone: HFCapture (+ encode, as the streaming producer does before sending) over this
    worker's share of the grant order, in batches of at most one producer's open leases."""
    p = argparse.ArgumentParser(prog="bench.pipeline_workers capture")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--keys", required=True)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=1)
    args = p.parse_args(argv)
    import datasets

    # Imported when this runs, not at the top: `draftstream bench --help` stays light.
    from producer.backend import CaptureRow
    from producer.capture import CaptureConfig, HFCapture
    from protocol.codec import encode
    from trainer.stream.config import StreamConfig

    defaults = {f.name: f.default for f in dataclasses.fields(StreamConfig)}
    per_lease, open_leases = defaults["samples_per_lease"], defaults["leases_per_producer"]
    keys = [tuple(k) for k in json.loads(Path(args.keys).read_text())]
    # Leases go to whichever producer has room; round-robin over lease-sized chunks is the even split.
    leases = [keys[i : i + per_lease] for i in range(0, len(keys), per_lease)][args.rank :: args.num_workers]
    mine = [k for lease in leases for k in lease]
    dataset = datasets.load_from_disk(args.data)
    dataset.set_format("torch", columns=["input_ids", "loss_mask"])
    backend = HFCapture(CaptureConfig(model=args.model, max_batch_tokens=CAPTURE_BATCH_TOKENS))
    rows = tokens = nbytes = 0
    batch = per_lease * open_leases  # the streaming producer captures its queued leases together
    start = time.perf_counter()
    for i in range(0, len(mine), batch):
        chunk = mine[i : i + batch]
        capture_rows = []
        for _, sid in chunk:
            item = dataset[sid]  # as the streaming producer looks rows up
            capture_rows.append(CaptureRow(sid, item["input_ids"], item["loss_mask"]))
        for sample in backend.capture(capture_rows, epoch=chunk[0][0]):
            frames = encode(sample)
            rows += 1
            tokens += int(sample.token_ids.shape[0])
            nbytes += sum(len(memoryview(f)) for f in frames)
    capture_s = time.perf_counter() - start
    backend.close()
    print(json.dumps({"rank": args.rank, "rows": rows, "tokens": tokens, "bytes": nbytes, "capture_s": capture_s}))
    return 0


def memtrain_worker(argv: list[str]) -> int:
    """Trainer alone: ``draftstream train`` whose file source reads every hidden-state file into an
    ``InMemorySampleSource`` once, before training, and serves from it."""
    # Imported when this runs, not at the top: `draftstream bench --help` stays light.
    from protocol.hsfile import list_hs_indices
    from trainer import train
    from trainer.data.sources import FileSampleSource, InMemorySampleSource

    report: dict = {}

    class PreloadedFileSource(FileSampleSource):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            start = time.perf_counter()
            ids = list_hs_indices(self.directory)
            self.memory = InMemorySampleSource([self.load(i) for i in ids])
            report.update(samples=len(ids), preload_s=time.perf_counter() - start)

        def fetch(self, sample_ids):
            return self.memory.fetch(sample_ids)

    code = train.main(argv, make_file_source=PreloadedFileSource)
    if not report:
        raise RuntimeError("trainer.train did not build its file source through make_file_source")
    print(json.dumps({**report, "exit_code": code}))
    return int(code or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    workers = {"capture": capture_worker, "memtrain": memtrain_worker}
    if not argv or argv[0] not in workers:
        print(f"usage: python -m bench.pipeline_workers <{'|'.join(workers)}> [args...]", file=sys.stderr)
        return 2
    return workers[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
