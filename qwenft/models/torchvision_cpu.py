"""torchvision on the CPU install: PyPI's torchvision with its compiled ops left unloaded.

The only torchvision wheel that matches torch 2.13.0 (0.28.0) is a CUDA build: its compiled
library (``torchvision/_C.so``, nms, roi_align, deform_conv2d ...) links libtorch_cuda and cannot
load beside the CPU torch. torchvision tolerates that (``torchvision.extension._has_ops()`` is
then False and those ops raise "Couldn't load custom C++ ops" when called), except in one place:
``torchvision/_meta_registrations.py`` registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` whatever happened, and ``torch.library.register_fake`` refuses an operator
nobody defined. So ``import torchvision`` fails ("operator torchvision::nms does not exist"),
transformers imports it whenever it is installed, and every LLaMA-Factory run fails with it.

The fix: define those two operators' schemas (as torchvision's C++ library declares them, no
kernel) just before that module runs, and only when the compiled library did not load. Every
process of the venv needs it, LLaMA-Factory's own included (llamafactory-cli, torchrun workers),
so ``scripts/setup_env.sh`` installs it for the CPU install's ``vision`` extra as a ``.pth`` file
in the venv's site-packages (``python -m qwenft.models.torchvision_cpu <site-packages>``). The
line it holds runs this file (loaded by its path, as module ``_qwenft_torchvision_cpu``: importing
the ``qwenft`` package in every interpreter would pin it to this checkout, hiding any other copy
on sys.path) and puts :class:`Hook` first on ``sys.meta_path``: a finder that finds nothing and
acts once, when ``torchvision._meta_registrations`` is looked up (after ``torchvision.extension``
tried to load ``_C``). Nothing heavy happens at interpreter start (+0.3 ms with this file's
bytecode cached, docs/vision.md): it imports only ``sys``; torch is imported by torchvision
itself, before the hook acts.

What the CPU install then lacks, honestly: torchvision's compiled ops (``torchvision.ops.nms``,
``roi_align``, ``deform_conv2d`` ... raise) and its compiled image codecs (``torchvision.io``'s
decode_jpeg/decode_png, also CUDA-linked). Qwen-VL fine-tuning uses neither: LLaMA-Factory
reads images with PIL, videos with PyAV, and the Qwen-VL processors resize and normalise with
torchvision's tensor transforms, which are plain torch. The CUDA install's torchvision loads its
ops and never gets this hook.
"""

from __future__ import annotations

import sys

PTH_NAME = "qwenft-torchvision-cpu.pth"
# The attribute that tells a Hook, whichever copy of this file made it (the .pth's or qwenft's).
MARK = "qwenft_torchvision_cpu"
TRIGGER = "torchvision._meta_registrations"  # imported by torchvision/__init__ after .extension
# The operators torchvision/_meta_registrations.py registers fake kernels for unconditionally,
# with the schemas torchvision's C++ library gives them (csrc/ops/nms.cpp, quantized qnms).
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

_library = None  # a torch.library.Library drops its definitions when collected: keep it


def define_missing_ops() -> list[str]:
    """Define (schema only, no kernel) the operators of SCHEMAS that torch does not know yet;
    return their names. Calling one of them still fails: torchvision's own ops check
    (`_assert_has_ops`) says why first."""
    global _library
    import torch

    names = [schema.split("(", 1)[0] for schema in SCHEMAS]
    missing = [
        (name, schema)
        for name, schema in zip(names, SCHEMAS, strict=True)
        if not hasattr(torch.ops.torchvision, name)
    ]
    if missing:
        if _library is None:
            _library = torch.library.Library("torchvision", "FRAGMENT")
        for _name, schema in missing:
            _library.define(schema)
    return [name for name, _schema in missing]


class Hook:
    """A sys.meta_path finder that finds nothing: when torchvision looks up TRIGGER, it removes
    itself and, if torchvision's compiled library did not load, defines the missing operators."""

    qwenft_torchvision_cpu = True  # MARK

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname != TRIGGER:
            return None
        uninstall()
        extension = sys.modules.get("torchvision.extension")
        if extension is not None and not extension._has_ops():
            define_missing_ops()
        return None


def installed() -> bool:
    return any(getattr(finder, MARK, False) for finder in sys.meta_path)


def install() -> None:
    """Put the hook first on sys.meta_path (once; not when torchvision is already imported)."""
    if TRIGGER not in sys.modules and not installed():
        sys.meta_path.insert(0, Hook())


def uninstall() -> None:
    # a new list, not the old one changed: the import system may be iterating over it (a Hook's
    # find_spec calls this), and removing an entry there would skip the finder after it
    sys.meta_path = [finder for finder in sys.meta_path if not getattr(finder, MARK, False)]


def pth_line() -> str:
    """The .pth line: load this file by its path and install the hook (site runs a .pth line
    that starts with "import"; importlib.util is already loaded by then)."""
    import os

    source = os.path.realpath(__file__)
    return (
        "import importlib.util as _u; "
        f"_s = _u.spec_from_file_location('_{MARK}', {source!r}); "
        "_m = _u.module_from_spec(_s); _s.loader.exec_module(_m); _m.install()\n"
    )


def write_pth(site_packages: str) -> str:
    """Write PTH_NAME into a site-packages folder (what setup_env.sh runs); return its path."""
    import os

    path = os.path.join(site_packages, PTH_NAME)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(pth_line())
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m {__spec__.name} SITE_PACKAGES  (writes {PTH_NAME} there)")
    print(write_pth(sys.argv[1]))
