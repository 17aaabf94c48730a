"""The training data and batch order of ``conceptmoe train`` (``src/train/Data.ts``): the token
streams the export wrote (``data/*.tokens.u8`` or ``.i32``, ``data/*.starts.json``) and the random
windows of step ``s``, a pure function of (seed, step) through the same generator."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from .context import prng


def load_stream(directory: str, name: str):
    path = os.path.join(directory, f"{name}.tokens.i32")
    tokens = np.fromfile(path, dtype="<i4")
    starts = json.load(open(os.path.join(directory, f"{name}.starts.json")))
    return tokens, starts


def batch_at(stream, offsets, length):
    """ids, targets (−1 across a document start) and document starts of rows at ``offsets``."""
    tokens, starts = stream
    start_set = set(starts)
    rows = len(offsets)
    ids = np.zeros((rows, length), dtype=np.int64)
    targets = np.full((rows, length), -1, dtype=np.int64)
    doc = np.zeros((rows, length), dtype=bool)
    for r, o in enumerate(offsets):
        ids[r] = tokens[o:o + length]
        for i in range(length):
            t = o + i
            if t + 1 < len(tokens) and (t + 1) not in start_set:
                targets[r, i] = tokens[t + 1]
            if i > 0 and t in start_set:
                doc[r, i] = True
    return torch.from_numpy(ids), torch.from_numpy(targets), torch.from_numpy(doc)


def train_batch(stream, rows: int, length: int, seed: int, step: int):
    random = prng((seed * 1000003 + step * 7919) % 2 ** 32)
    top = len(stream[0]) - length - 1
    return batch_at(stream, [int(random() * top) for _ in range(rows)], length)


def validation_batches(stream, rows: int, length: int, count: int):
    return [batch_at(stream, [(b * rows + r) * length for r in range(rows)], length) for b in range(count)]
