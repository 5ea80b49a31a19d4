"""Run folders: the typed manifest (qwenft.json), creating and listing folders, the loss watch."""
