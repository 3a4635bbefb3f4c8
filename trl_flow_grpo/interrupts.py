"""Ctrl-C and SIGTERM during training: a checkpoint of the last completed step, then a stop.

A preempted job (SLURM, Kubernetes, spot instances) gets SIGTERM and some seconds before SIGKILL; a person presses
Ctrl-C. Either way the run should lose at most the optimizer step in progress, on one process or on many.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator

from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal(TrainerCallback):
    """Turns the first SIGINT or SIGTERM during `train()` into a checkpoint and a stop.

    Between optimizer updates the model holds the weights of the last completed step, so the signal handler saves
    them at once with `save_now` (which must not communicate with other processes: they may be anywhere in the step).
    A signal that arrives while the weights are being changed or written (an optimizer update, from
    `on_pre_optimizer_step` to `on_step_end`, or a `deferred()` block such as a checkpoint save or the EMA swap) is
    acted on when that ends. Then:

    - one process: `KeyboardInterrupt` is raised at once; the step in progress is dropped;
    - several processes: every process finishes the step in progress (a process that left would keep the others
      waiting in a collective operation), they agree at the step's end (`any_process`), the trainer saves that step
      too and stops, and `stopped_at` tells `train()` to raise `KeyboardInterrupt`.

    A second signal raises `KeyboardInterrupt` at once. Handlers are installed on the main thread only, by
    `installed()`, and the previous ones are restored when it exits.

    Args:
        save_now (`Callable[[], None]`):
            Writes the checkpoint of the last completed step from this process, without collective operations.
        any_process (`Callable[[bool], bool]`):
            Whether any process passes `True` (a collective operation, called by every process at every step end).
        num_processes (`int`):
            Number of training processes.
    """

    def __init__(self, save_now: Callable[[], None], any_process: Callable[[bool], bool], num_processes: int):
        self.save_now = save_now
        self.any_process = any_process
        self.num_processes = num_processes
        self._reset()

    def _reset(self) -> None:
        self.active = False  # between on_train_begin and on_train_end
        self.busy = 0  # depth of update / deferred blocks
        self.pending: int | None = None  # a signal received while busy
        self.received: int | None = None  # the signal acted on
        self.stopped_at: int | None = None  # the step after which the processes stopped together

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Install the handlers for the duration (on the main thread; elsewhere signals keep their handlers)."""
        self._reset()
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.active = False

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A block during which a signal waits (the weights are being changed or written)."""
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1
        self._release()

    @property
    def between_updates(self) -> bool:
        """Training is under way and the model holds exactly the weights of the last completed step."""
        return self.active and self.busy == 0

    # ------------------------------------------------------------- handling
    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self.active or self.received is not None or self.pending is not None:
            raise KeyboardInterrupt(name)
        if self.busy:
            self.pending = signum
            return
        self._act(signum, save=True)

    def _release(self) -> None:
        if self.busy == 0 and self.pending is not None:
            signum, self.pending = self.pending, None
            # With several processes the step's end saves next, together; one process saves here.
            self._act(signum, save=self.num_processes == 1)

    def _act(self, signum: int, save: bool) -> None:
        name = signal.Signals(signum).name
        self.received = signum
        if save:
            self.save_now()
        if self.num_processes == 1:
            raise KeyboardInterrupt(name)
        logger.warning(
            "%s received: finishing the step in progress on every process, then saving a checkpoint and stopping. "
            "Send it again to stop at once.",
            name,
        )

    # ------------------------------------------------------------ callbacks
    def on_train_begin(self, args, state, control, **kwargs):
        self.active = True

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.busy += 1

    def on_step_end(self, args, state, control, **kwargs):
        # Called after the EMA update (this callback is registered after it) and after `global_step += 1`.
        self.busy = max(self.busy - 1, 0)
        self._release()
        if self.num_processes > 1 and self.any_process(self.received is not None):
            control.should_save = args.save_strategy != "no"
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.active = False


def newest_complete_checkpoint(output_dir: str) -> str:
    """The newest `checkpoint-<step>` folder in `output_dir` that holds `trainer_state.json` (written last, so a save
    killed halfway is skipped, with a warning)."""
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    steps = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = pattern.match(name)
            if match and os.path.isdir(os.path.join(output_dir, name)):
                steps.append(int(match.group(1)))
    for step in sorted(steps, reverse=True):
        folder = os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME)):
            return folder
        logger.warning("Skipping %s: it has no %s (its save was interrupted).", folder, TRAINER_STATE_NAME)
    raise ValueError(
        f"resume_from_checkpoint=True, but {output_dir!r} has no complete {PREFIX_CHECKPOINT_DIR}-<step> folder (one "
        f"with {TRAINER_STATE_NAME}). Pass a checkpoint folder, or train without resume_from_checkpoint."
    )
