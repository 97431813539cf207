"""Errors users see. Each message names the file or argument at fault and what to do about it."""

from __future__ import annotations


class MedTransferError(Exception):
    """Base class: the CLI prints these as one clear message instead of a traceback."""


class UnknownModelError(MedTransferError, KeyError):
    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class WeightsNotFoundError(MedTransferError, FileNotFoundError):
    pass


class CheckpointError(MedTransferError):
    """A weight file that cannot be read: missing, corrupt, truncated, unsafe or of an unknown format."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would need arbitrary objects (possibly code) to load."""


class CheckpointMismatchError(MedTransferError):
    """A readable checkpoint that does not fit the model (another architecture, or too little of it loads)."""


class DataError(MedTransferError):
    """An image or dataset that cannot be used as it is: the message names the file and the fix."""


class OutputPathError(MedTransferError):
    """An output path a command may not write (a file where a folder is needed, a path under a file, a folder that
    cannot be written); raised before the command computes or writes anything."""
