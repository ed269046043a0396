"""Metric writers for the trainer: workdir/metrics.jsonl and TensorBoard event files.

Both implement clu's `MetricWriter` interface. clu's own writers package imports TensorFlow when
it is imported; where TensorFlow is absent (our default install) the same classes stand on their
own, and TensorBoard files are written through tensorboardX.
"""
from __future__ import annotations

import json
import os

import numpy as np

try:
    from clu.metric_writers import interface as _clu_interface
    from clu.metric_writers import multi_writer as _clu_multi
    _MetricWriter = _clu_interface.MetricWriter
except ImportError:  # clu.metric_writers/__init__ imports tensorflow
    _clu_multi = None
    _MetricWriter = object


class _Writer(_MetricWriter):
    """No-op defaults for the parts of clu's interface the trainer does not use."""

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_hparams(self, hparams):
        pass


class JsonlWriter(_Writer):
    """One JSON object per logged step: {"step": s, "<metric>": value, ...}."""

    def __init__(self, path: str, truncate_after: int | None = None):
        self.path = path
        if truncate_after is not None and os.path.exists(path):
            # resuming: drop records a killed run wrote after the checkpoint we restarted from
            with open(path) as f:
                keep = [line for line in f if line.strip()
                        and json.loads(line).get("step", 0) <= truncate_after]
            with open(path, "w") as f:
                f.writelines(keep)
        self._f = open(path, "a")

    def write_scalars(self, step, scalars):
        record = {"step": int(step)}
        record.update({k: float(v) for k, v in scalars.items()})
        self._f.write(json.dumps(record) + "\n")

    def write_histograms(self, step, arrays, num_buckets=None):
        record = {"step": int(step), "histograms": {k: np.asarray(v).tolist()
                                                    for k, v in arrays.items()}}
        self._f.write(json.dumps(record) + "\n")

    def flush(self):
        self._f.flush()

    def close(self):
        self._f.close()


class TensorBoardWriter(_Writer):
    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter
        self._w = SummaryWriter(logdir)

    def write_scalars(self, step, scalars):
        for k, v in scalars.items():
            self._w.add_scalar(k, float(v), int(step))

    def write_texts(self, step, texts):
        for k, v in texts.items():
            self._w.add_text(k, str(v), int(step))

    def write_histograms(self, step, arrays, num_buckets=None):
        # expert loads are per-expert counts: log them as a bar-like histogram over expert ids
        for k, v in arrays.items():
            v = np.asarray(v, np.float64)
            self._w.add_histogram_raw(k, min=0, max=len(v), num=float(v.sum()), sum=float(
                (np.arange(len(v)) * v).sum()), sum_squares=float((np.arange(len(v)) ** 2 * v).sum()),
                bucket_limits=list(np.arange(1, len(v) + 1, dtype=float)),
                bucket_counts=list(v), global_step=int(step))

    def flush(self):
        self._w.flush()

    def close(self):
        self._w.close()


class MultiWriter:
    """Forwards every call to each writer (clu's MultiWriter when clu's writers import)."""

    def __init__(self, writers):
        self._writers = writers

    def __getattr__(self, name):
        def call(*args, **kwargs):
            for w in self._writers:
                getattr(w, name)(*args, **kwargs)
        return call


def create(workdir: str, truncate_after: int | None = None):
    writers = [JsonlWriter(os.path.join(workdir, "metrics.jsonl"), truncate_after),
               TensorBoardWriter(os.path.join(workdir, "tensorboard"))]
    return _clu_multi.MultiWriter(writers) if _clu_multi else MultiWriter(writers)


def null():
    """For processes other than 0: every call does nothing."""
    return MultiWriter([])
