"""How text encoders cut their input into batches."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

MAX_BATCH_TOKENS = 4096  # padded tokens per text batch: attention's cost grows with rows x length
TEXT_BATCH_ROWS = 256  # titles per batch at most (a batch of short titles stops here before the token cap)


def token_batches(items: Iterable[T], length: Callable[[T], int], max_rows: int,
                  max_tokens: int = MAX_BATCH_TOKENS) -> Iterator[list[T]]:
    """The items sorted by length and cut into batches of at most max_rows rows and, padded to their longest,
    max_tokens tokens: short texts go many to a batch, long ones few, and no batch is mostly padding."""
    batch: list[T] = []
    for item in sorted(items, key=length):
        if batch and (len(batch) >= max_rows or (len(batch) + 1) * max(length(item), 1) > max_tokens):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch
