"""Where samples come from and how they become batches: the batch plan, the fetch order, sample
sources (files, memory; the stream source lives in ``trainer.stream``), packing and prefetch."""
