"""Activation memory: the bytes autograd keeps for the backward, counted with saved-tensor
hooks. Exact and device-independent: it depends only on which tensors the ops save.

Every tensor an autograd node saves passes through the pack hook. The ledger counts each
distinct storage once (ops often save views of one tensor, or the same tensor twice) at its
full size (a saved view keeps its whole storage alive), and leaves out the storages of the
tensors it is told to ignore: the model's parameters, which are not activations.
"""

from __future__ import annotations

from typing import Iterable

import torch


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(key, bytes) of the storage behind ``t``."""
    storage = t.untyped_storage()
    return (t.device.type, t.device.index, storage.data_ptr()), storage.nbytes()


class SavedTensorLedger:
    """``with SavedTensorLedger(ignore=model.parameters()) as ledger: loss = model(x)``; then
    ``ledger.bytes`` is what the graph holds for the backward, ``ledger.tensors`` how many
    distinct storages. Storages are keyed by address, which is sound because every saved
    storage stays alive (held by the graph) while the forward runs."""

    def __init__(self, ignore: Iterable[torch.Tensor] = ()):
        self._ignored = {_storage(t)[0] for t in ignore}
        self._seen: dict[tuple, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage(t)
        if key not in self._ignored:
            self._seen.setdefault(key, nbytes)
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> "SavedTensorLedger":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    @property
    def tensors(self) -> int:
        return len(self._seen)
