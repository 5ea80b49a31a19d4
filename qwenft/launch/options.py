"""The launchers' own options, one row each: `qwenft train`'s options (cli.common.launch_options)
and the check that each is given only with a launcher that takes it come from this table."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from qwenft.choices import Launcher
from qwenft.errors import QwenftError

SLURM, KUBEFLOW, SKYPILOT, RAY = Launcher.SLURM, Launcher.KUBEFLOW, Launcher.SKYPILOT, Launcher.RAY


@dataclass(frozen=True)
class LaunchOption:
    param: str  # the LaunchRequest field and the Typer parameter
    option: str
    type: Any
    help: str
    launchers: tuple[Launcher, ...]
    pattern: str | None = None  # what a value must look like (it lands in a script or a YAML)
    example: str = ""


LAUNCH_OPTIONS = (
    LaunchOption(
        "partition",
        "--partition",
        str,
        "Slurm partition (#SBATCH --partition).",
        (SLURM,),
        r"[\w.,-]+",
        "gpu",
    ),
    LaunchOption(
        "time",
        "--time",
        str,
        "Slurm time limit, e.g. 04:00:00 or 2-00:00:00.",
        (SLURM,),
        r"(\d+-)?\d+(:\d\d){0,2}",
        "04:00:00",
    ),
    LaunchOption(
        "account", "--account", str, "Slurm account to charge.", (SLURM,), r"[\w.-]+", "mylab"
    ),
    LaunchOption(
        "sbatch_args",
        "--sbatch-arg",
        list[str],
        "Another #SBATCH line, e.g. --qos=high (repeatable).",
        (SLURM,),
        r"--?[\w-]+(=\S+)?",
        "--qos=high",
    ),
    LaunchOption(
        "submit",
        "--submit",
        bool,
        "Submit the prepared job with sbatch and record its id.",
        (SLURM,),
    ),
    LaunchOption(
        "image",
        "--image",
        str,
        "Container image with qwenft installed (Kubeflow).",
        (KUBEFLOW,),
        r"\S+",
        "registry.example.com/qwenft:latest",
    ),
    LaunchOption(
        "accelerators",
        "--accelerators",
        str,
        "SkyPilot accelerators, e.g. H100:8 (default: A100:<gpus per node>).",
        (SKYPILOT,),
        r"[\w.-]+(:\d+)?",
        "H100:8",
    ),
    LaunchOption(
        "workers",
        "--workers",
        int,
        "Ray workers: one GPU each, or one CPU process where there is no GPU.",
        (RAY,),
    ),
)
BY_PARAM = {o.param: o for o in LAUNCH_OPTIONS}


@dataclass
class LaunchRequest:
    """How `qwenft train` starts the run (--launcher and its options)."""

    launcher: str = Launcher.LOCAL.value
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    sbatch_args: list[str] = field(default_factory=list)
    submit: bool = False
    image: str | None = None
    accelerators: str | None = None
    workers: int | None = None

    @classmethod
    def from_options(cls, launcher: str | None, values: Mapping[str, Any]) -> LaunchRequest:
        given = {k: v for k, v in values.items() if v not in (None, False, [], ())}
        return cls(launcher=launcher or Launcher.LOCAL.value, **given)

    @property
    def kind(self) -> Launcher:
        return Launcher(self.launcher)

    def given(self) -> dict[str, Any]:
        """The launcher options set, by parameter (defaults left out)."""
        defaults = LaunchRequest()
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "launcher" and getattr(self, f.name) != getattr(defaults, f.name)
        }


def problems(req: LaunchRequest, nnodes: int | None, *, dry_run: bool) -> list[QwenftError]:
    """Every problem of the launcher's options at once (an option for another launcher, a value
    that would break the file it lands in, what a launcher needs and was not given)."""
    launcher = Launcher(Launcher.parse(req.launcher, "--launcher"))
    out = []
    for param, value in req.given().items():
        opt = BY_PARAM[param]
        if launcher not in opt.launchers:
            takers = " | ".join(str(x) for x in opt.launchers)
            out.append(
                QwenftError(
                    f"{opt.option} is for --launcher {takers}, not --launcher {launcher}",
                    f"add --launcher {opt.launchers[0]}, or drop {opt.option}",
                )
            )
            continue
        for text in value if isinstance(value, list) else [value]:
            if opt.pattern and not re.fullmatch(opt.pattern, str(text)):
                out.append(
                    QwenftError(
                        f"{opt.option} {text!r} is not a valid value (it is written into the "
                        f"{launcher.facts.file}); spaces and shell characters are refused",
                        f"e.g. {opt.option} {opt.example}",
                    )
                )
    if launcher.facts.remote:
        if nnodes is None:
            out.append(
                QwenftError(
                    f"--launcher {launcher} needs --nodes",
                    f"--nodes N: the machines the {launcher.facts.file} asks for (1 for one)",
                )
            )
        if launcher != SLURM and not dry_run:
            out.append(
                QwenftError(
                    f"--launcher {launcher} only renders its {launcher.facts.file}: add --dry-run",
                    f"qwenft train ... --launcher {launcher} --dry-run > {launcher.facts.file}, "
                    f"then {'kubectl apply -f' if launcher == KUBEFLOW else 'sky launch'} "
                    f"{launcher.facts.file}",
                )
            )
    if launcher == RAY and (req.workers is None or req.workers < 1):
        out.append(
            QwenftError(
                "--launcher ray needs --workers N (N >= 1)",
                "--workers 2: two workers, one GPU each (one CPU process each without GPUs)",
            )
        )
    if req.submit and dry_run:
        out.append(QwenftError("--submit and --dry-run exclude each other", "drop one of them"))
    return out


NO_LAUNCH = LaunchRequest()  # the default of train's `launch` parameter (launch_options fills it)
