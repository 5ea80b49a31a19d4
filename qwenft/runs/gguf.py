"""A run's GGUF exports (RUN/export, recorded in the manifest by `qwenft export`): the one that
`chat` and `serve --backend llama.cpp` load."""

from __future__ import annotations

from pathlib import Path

from qwenft.errors import QwenftError
from qwenft.runs.manifest import Manifest


def exported_gguf(run_dir: Path | None, manifest: Manifest | None) -> Path:
    """The run's most recent GGUF export that is still there (chat/serve --backend llama.cpp),
    also when the run folder has been copied or moved since the export."""
    if run_dir is None or manifest is None:
        raise QwenftError(
            "--backend llama.cpp serves a run's GGUF export; this is not a run folder",
            "export a run first: qwenft export RUN_DIR",
        )
    for record in reversed(manifest.exports):
        recorded = Path(record.get("file", ""))
        # this folder's own export/ first (a run folder copied or moved elsewhere: the manifest
        # still names where it was exported), then the recorded path
        for path in (Path(run_dir) / "export" / recorded.name, recorded):
            if recorded.name and path.is_file():
                return path
    raise QwenftError(
        f"{run_dir} has no GGUF export yet",
        f"qwenft export {run_dir} (then --backend llama.cpp uses it)",
    )
