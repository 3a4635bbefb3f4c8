"""Checksums of a checkpoint, recorded when it is saved and verified before it is resumed.

`write_manifest` records the size and SHA-256 of every file the main process wrote into a `checkpoint-<step>` folder
in `checkpoint_manifest.json`, just before `trainer_state.json` (which marks the checkpoint complete).
`verify_checkpoint` runs before resuming: a missing optimizer or scheduler state (with which transformers would
silently start a fresh optimizer), a file missing from the folder, shorter or longer than recorded, or with other
contents is an error naming the file, unless the caller allows damaged checkpoints, which turns each into a warning.
Checkpoints without a manifest (written by an older version) get a readability check of their safetensors and JSON
files instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any

logger = logging.getLogger(__name__)

MANIFEST_NAME = "checkpoint_manifest.json"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
TRAINER_STATE_NAME = "trainer_state.json"
# Files written by processes other than the main one (possibly still being written when the manifest is).
_OTHER_PROCESS_FILE = re.compile(r"^(rng_state|rollout_buffer)_([1-9][0-9]*)\.(pth|safetensors)$")
# The temporary file safetensors (Rust's `tempfile`: ".tmp" and 6 characters) writes and renames into place: another
# process's file being written at that moment, never part of the checkpoint (recording it made a 2-process resume
# fail on ".tmpXXXXXX is missing").
_TEMPORARY_FILE = re.compile(r"^\.tmp[A-Za-z0-9_]{6}$")
_CHUNK = 1 << 20


class DamagedCheckpointError(ValueError):
    """A checkpoint that cannot be resumed as it was saved (a file missing, truncated or changed)."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _recorded_files(folder: str) -> list[str]:
    files = []
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.relpath(os.path.join(root, name), folder)
            if path in (MANIFEST_NAME, TRAINER_STATE_NAME) or name.endswith(".tmp"):
                continue
            if _OTHER_PROCESS_FILE.match(name) or _TEMPORARY_FILE.match(name):
                continue
            files.append(path.replace(os.sep, "/"))
    return sorted(files)


def write_manifest(folder: str) -> None:
    """Record the size and SHA-256 of the files of `folder` in `folder/checkpoint_manifest.json` (atomically)."""
    entries = {}
    for path in _recorded_files(folder):
        full = os.path.join(folder, path)
        entries[path] = {"size": os.path.getsize(full), "sha256": _sha256(full)}
    temporary = os.path.join(folder, MANIFEST_NAME + ".tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({"version": 1, "files": entries}, f, indent=1, sort_keys=True)
    os.replace(temporary, os.path.join(folder, MANIFEST_NAME))


def _readable(path: str) -> str | None:
    """Why `path` (a safetensors or JSON file) cannot be read, or None."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
                if keys:
                    f.get_slice(keys[-1])  # the header and the last tensor's offsets
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                header = int.from_bytes(f.read(8), "little")
                meta = json.loads(f.read(header))
            end = max((t["data_offsets"][1] for k, t in meta.items() if k != "__metadata__"), default=0)
            if 8 + header + end > size:
                return f"truncated ({size} bytes, its header describes {8 + header + end})"
        elif path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                json.load(f)
    except Exception as error:  # the library's own error names no file: ours does
        return f"unreadable ({type(error).__name__}: {error})"
    return None


def checkpoint_problems(folder: str, require_optimizer: bool = True) -> list[str]:
    """What is wrong with the checkpoint `folder`, one line per file (empty when it can be resumed as saved)."""
    problems = []
    if not os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME)):
        problems.append(f"{TRAINER_STATE_NAME} is missing (the save was cut off)")
    if require_optimizer:
        for name, what in ((OPTIMIZER_NAME, "optimizer"), (SCHEDULER_NAME, "learning-rate scheduler")):
            if not os.path.isfile(os.path.join(folder, name)):
                problems.append(f"{name} is missing: the {what} would start fresh instead of continuing")
    manifest_path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        for path in _recorded_files(folder):
            reason = _readable(os.path.join(folder, path))
            if reason:
                problems.append(f"{path} is {reason}")
        return problems
    try:
        with open(manifest_path, encoding="utf-8") as f:
            recorded: dict[str, Any] = json.load(f)["files"]
    except Exception as error:
        return [*problems, f"{MANIFEST_NAME} is unreadable ({type(error).__name__}: {error})"]
    for path, entry in sorted(recorded.items()):
        full = os.path.join(folder, path)
        if not os.path.isfile(full):
            if not any(p.startswith(path + " ") for p in problems):
                problems.append(f"{path} is missing (it was saved with the checkpoint)")
        elif os.path.getsize(full) != entry["size"]:
            problems.append(
                f"{path} is truncated or changed: {os.path.getsize(full)} bytes, saved with {entry['size']}"
            )
        elif _sha256(full) != entry["sha256"]:
            problems.append(f"{path} does not match the checksum recorded when it was saved (its contents changed)")
    return problems


def verify_checkpoint(folder: str, allow_damaged: bool = False, require_optimizer: bool = True) -> None:
    """Raise `DamagedCheckpointError` naming every missing, truncated or changed file of the checkpoint `folder`, or
    (with `allow_damaged`) log a warning for each."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Cannot resume from {folder}: no such folder. Pass a checkpoint-<step> folder.")
    problems = checkpoint_problems(folder, require_optimizer=require_optimizer)
    if not problems:
        return
    if allow_damaged:
        for problem in problems:
            logger.warning(
                "Resuming from a damaged checkpoint %s (resume_allow_damaged_checkpoint=True): %s", folder, problem
            )
        return
    listed = "\n".join(f"  - {problem}" for problem in problems)
    raise DamagedCheckpointError(
        f"Cannot resume from {folder}: it is damaged, and resuming it would continue a different run:\n{listed}\n"
        "Resume from an earlier checkpoint-<step>, or set resume_allow_damaged_checkpoint=True to continue anyway "
        "(with a warning per file)."
    )
