"""When to checkpoint, and where a resumed run stands.

``Checkpointer`` owns the checkpoint policy (every ``checkpoint.every_steps`` optimizer steps, every
epoch end and the last step), the restore of Ray's latest checkpoint through the safe loader of
``workers.checkpoint``, and rank 0's step history, which is cut back to the restored step and saved
with every checkpoint so that it always tells the story of the run that produced the final model.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray.train

from system import storage
from system.training import CheckpointConfig
from workers.checkpoint import CheckpointError, load_checkpoint

log = logging.getLogger("clustercam.train")
CHECKPOINT_TAG = "checkpoint"
STATE_FILE = "train_state.json"


@dataclass
class Position:
    """Where the run stands: the data position and the optimizer step."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in ``epoch``
    global_step: int = 0

    def advanced(self) -> Position:
        """The position after one more optimizer step in the same epoch."""
        return Position(self.epoch, self.step_in_epoch + 1, self.global_step + 1)

    def normalized(self, steps_per_epoch: int) -> Position:
        """A finished epoch is the start of the next one."""
        if self.step_in_epoch >= steps_per_epoch:
            return Position(self.epoch + 1, 0, self.global_step)
        return self


class History:
    """Rank 0's per-step metrics, kept in ``<run>/history.jsonl`` and cut back to the restored step
    on resume, so the file always tells the story of the run that produced the final model."""

    def __init__(self, run_uri: str, upto_step: int):
        self.uri = run_uri + "/history.jsonl"
        self.rows: list[dict] = []
        if upto_step and storage.exists(self.uri):
            lines = storage.get_bytes(self.uri).decode().splitlines()
            self.rows = [row for row in map(json.loads, lines) if row["step"] <= upto_step]

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def save(self) -> None:
        storage.put_bytes(self.uri, "".join(json.dumps(r) + "\n" for r in self.rows).encode())


class Checkpointer:
    """Restores and saves one DeepSpeed engine's checkpoints through Ray Train, and keeps the history."""

    def __init__(self, cfg: CheckpointConfig, engine, run_uri: str, rank: int):
        self.cfg, self.engine, self.run_uri, self.rank = cfg, engine, run_uri, rank
        self.history: History | None = None

    def restore(self) -> Position:
        """The position of Ray's latest checkpoint (a new run: step 0), its model and optimizer states
        loaded as data; rank 0's history is cut back to that step.

        A file that is not plain data (``CheckpointError``) fails the run: starting over from
        step 0 would hide the tampering and discard the run's progress.
        """
        position = self._load()
        if self.rank == 0:
            self.history = History(self.run_uri, position.global_step)
        return position

    def _load(self) -> Position:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return Position()
        with checkpoint.as_directory() as directory:
            try:
                client_state = load_checkpoint(self.engine, directory, CHECKPOINT_TAG)
            except CheckpointError as err:  # ``directory`` is a local copy: name the stored checkpoint too
                raise CheckpointError(f"checkpoint {checkpoint.path}: {err}") from err
        position = Position(**client_state["position"])
        log.info("resumed from %s at epoch %d, step %d", checkpoint.path, position.epoch, position.global_step)
        return position

    def record(self, row: dict) -> None:
        """A step's metrics for the history (rank 0; the node list is a property of the run, not the step)."""
        if self.history is not None:
            self.history.add({k: v for k, v in row.items() if k != "nodes"})

    def due(self, position: Position, epoch_end: bool, finished: bool) -> bool:
        every = self.cfg.every_steps
        return epoch_end or finished or bool(every and position.global_step % every == 0)

    def maybe_save(self, position: Position, epoch_end: bool, finished: bool, row: dict) -> None:
        if not self.due(position, epoch_end, finished):
            return
        if self.history is not None:
            self.history.save()
        self._save(position, row)

    def _save(self, position: Position, metrics: dict) -> None:
        """Every rank writes its own ZeRO shard and reports it; Ray merges them into one checkpoint.

        With ``async_upload`` Ray uploads the directory in the background (and deletes it after), so a
        large checkpoint on its way to object storage does not stall the next steps.
        """
        directory = tempfile.mkdtemp(prefix="clustercam-ckpt-")
        self.engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, client_state={"position": position.__dict__})
        if self.rank == 0:
            Path(directory, STATE_FILE).write_text(json.dumps({**position.__dict__, **metrics}, indent=1))
        upload = ray.train.CheckpointUploadMode
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_upload_mode=upload.ASYNC if self.cfg.async_upload else upload.SYNC,
            delete_local_checkpoint_after_upload=True,
        )
