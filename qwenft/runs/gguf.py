"""A run's GGUF exports (RUN/export, recorded in the manifest by `qwenft export`): the one that
`chat` and `serve --backend llama.cpp` load."""

from __future__ import annotations

from pathlib import Path

from qwenft.errors import QwenftError
from qwenft.runs.manifest import Manifest


def exported_gguf(run_dir: Path | None, manifest: Manifest | None) -> Path:
    """The run's most recent GGUF export that is still there (chat/serve --backend llama.cpp),
    also when the run folder has been copied or moved since the export (read_manifest resolves
    the recorded files against the folder it reads)."""
    if run_dir is None or manifest is None:
        raise QwenftError(
            "--backend llama.cpp serves a run's GGUF export; this is not a run folder",
            "export a run first: qwenft export RUN_DIR",
        )
    for record in reversed(manifest.exports):
        path = Path(record.get("file") or "")
        if path.name and path.is_file():
            return path
    raise QwenftError(
        f"{run_dir} has no GGUF export yet",
        f"qwenft export {run_dir} (then --backend llama.cpp uses it)",
    )
