"""Process control any layer may use: running children under the supervisor (launcher) and the
supervisor itself (supervise). Standard library only; nothing here knows LLaMA-Factory."""
