"""Image rows: qwenft's chat shape with images, as LLaMA-Factory 0.9.5 trains Qwen2-VL, Qwen2.5-VL
and Qwen3-VL on them (issue 26).

A row is the sft chat shape plus ``"images": [paths]``, each path relative to the data file's
folder (or absolute), and one ``<image>`` placeholder (LLaMA-Factory's IMAGE_PLACEHOLDER) per
image, in the images' order, in the user turns (tool results may hold them too):

    {"messages": [{"role": "user", "content": "<image>Who are they?"}, {"role": "assistant",
     "content": "..."}], "images": ["photos/1.jpg"]}

This is LLaMA-Factory's own mllm_demo shape. Each placeholder becomes ``<|vision_start|>``, the
image's tokens (``<|image_pad|>`` times N) and ``<|vision_end|>``; N follows from the image's size:
LLaMA-Factory first scales it into [image_min_pixels, image_max_pixels] (its
``_preprocess_image``, then Qwen2VLPlugin's: sides of at least 28, aspect ratio at most 200),
then the model's image processor rounds it to multiples of patch_size * merge_size within its own
pixel range (transformers' ``smart_resize``), and every merge_size x merge_size patches make one
token. All of it is reproduced here as arithmetic (no torch, no transformers; Pillow reads the
sizes).

Where images are found when training: LLaMA-Factory joins each path to its ``media_dir``
(default: the ``dataset_dir`` of dataset_info.json, which is not the data file's folder), and uses
the path as it is when that file does not exist. qwenft's rule, relative to the data file, is
LLaMA-Factory's with ``media_dir`` set to the data file's folder (media_dir()): train.yaml sets it.

Videos and audios are refused (not supported yet), and so are images in preference, KTO and pt
data. Nothing here prints or exits.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from qwenft.choices import DataKind
from qwenft.data.messages import ASSISTANT, FUNCTION_CALL, SYSTEM, TOOL, USER
from qwenft.data.reader import BAD, Collector, iter_rows, jtype, open_data_file
from qwenft.errors import QwenftError

IMAGES = "images"  # the row's column of image paths (the dataset entry maps it)
REFUSED_MEDIA = ("videos", "audios")  # LLaMA-Factory reads them; qwenft does not yet
MEDIA_KEYS = (IMAGES, *REFUSED_MEDIA)
IMAGE_PLACEHOLDER = "<image>"  # LLaMA-Factory's IMAGE_PLACEHOLDER (extras/constants.py)
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
PLACEHOLDER_ROLES = (USER, TOOL)  # turns whose placeholders LLaMA-Factory expands, without loss

# LLaMA-Factory 0.9.5's ProcessorArguments defaults (train.yaml's image_max_pixels and
# image_min_pixels; `--image-max-pixels` / `--image-min-pixels`).
DEFAULT_MAX_PIXELS = 768 * 768
DEFAULT_MIN_PIXELS = 32 * 32

LF_TOKENIZES_WHY = (
    "the data has images: LLaMA-Factory tokenizes image rows itself (its vision processor reads "
    "every image and expands each <image> into that image's tokens)"
)
REMOTE_WHY = (
    "qwenft trains from local files (LLaMA-Factory would try to open the URL as a path); download "
    "the images first and list their paths"
)
VIDEO_WHY = (
    "not supported yet: qwenft trains images only; keep such rows out (videos and audios would "
    "not reach the model)"
)
KIND_WHY = (
    "images train with --stage sft only: multimodal {kind} data is not supported (the images "
    "would not reach the model); keep such rows out, or train them as sft"
)
_REMOTE_RE = re.compile(r"(?i)^(https?|ftp|s3|gs)://")


# --------------------------------------------------------------------------------------------------
# the token count of an image


@dataclass(frozen=True)
class VisionProcessor:
    """What the token count needs of the model's image processor (its preprocessor_config.json):
    patch_size, merge_size and its own pixel range. The defaults are Qwen2-VL's and Qwen2.5-VL's
    (transformers' Qwen2VLImageProcessor); Qwen3-VL's config says patch 16 and 65536..16777216."""

    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    source: str = ""  # the config file it was read from ("": the defaults)

    @property
    def factor(self) -> int:
        """The side of one token's square of pixels (patch_size * merge_size)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_model(cls, model_dir: Path | str | None) -> VisionProcessor:
        """The image processor of a model folder: preprocessor_config.json (or the
        image_processor of processor_config.json), read as transformers reads it (min_pixels and
        max_pixels over size's shortest_edge and longest_edge); a hub id's from the hub cache;
        the defaults where there is neither (a text model, or a hub id not downloaded)."""
        folder = _model_folder(str(model_dir)) if model_dir else None
        if folder is None:
            return cls()
        for name, key in (
            ("preprocessor_config.json", None),
            ("processor_config.json", "image_processor"),
        ):
            try:
                config = json.loads((folder / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if key is not None:
                config = config.get(key) if isinstance(config, dict) else None
            if not isinstance(config, dict):
                continue
            base = cls()
            size = config.get("size") if isinstance(config.get("size"), dict) else {}
            low = config.get("min_pixels") or size.get("shortest_edge") or base.min_pixels
            high = config.get("max_pixels") or size.get("longest_edge") or base.max_pixels
            return cls(
                patch_size=int(config.get("patch_size") or base.patch_size),
                merge_size=int(config.get("merge_size") or base.merge_size),
                min_pixels=int(low),
                max_pixels=int(high),
                source=str(folder / name),
            )
        return cls()

    def describe(self) -> str:
        where = "the model's image processor" if self.source else "Qwen2-VL's image processor"
        return f"{where}: patch {self.patch_size}, merge {self.merge_size}"


def _model_folder(model: str) -> Path | None:
    """A model's local folder: the folder itself, or a hub id's snapshot in the hub cache (where
    its processor config is; nothing is downloaded)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "preprocessor_config.json")
    except Exception:  # noqa: BLE001 - not installed, or not a hub id: not cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """transformers' qwen2_vl smart_resize: (height, width) rounded to multiples of factor (Python's
    round, half to even), scaled down into max_pixels or up into min_pixels."""
    if max(height, width) / min(height, width) > 200:
        raise QwenftError(
            f"an image of {width}x{height}: its aspect ratio is over 200 (the image processor "
            "refuses it)"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def lf_image_size(width: int, height: int, max_pixels: int, min_pixels: int) -> tuple[int, int]:
    """The (width, height) LLaMA-Factory 0.9.5 hands the image processor: MMPluginMixin's
    _preprocess_image (scaled into image_max_pixels, then up to image_min_pixels, each side cut to
    a whole number), then Qwen2VLPlugin's (sides of at least 28, aspect ratio at most 200)."""
    if width * height > max_pixels:
        f = math.sqrt(max_pixels / (width * height))
        width, height = int(width * f), int(height * f)
    if width * height < min_pixels:
        f = math.sqrt(min_pixels / (width * height))
        width, height = int(width * f), int(height * f)
    if min(width, height) < 28:
        width, height = max(width, 28), max(height, 28)
    if width / height > 200:
        width = height * 180
    if height / width > 200:
        height = width * 180
    return width, height


@dataclass(frozen=True)
class ImageTokens:
    """How many tokens each image becomes in training: the run's image_max_pixels and
    image_min_pixels (LLaMA-Factory's defaults unless set) and the model's image processor."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    min_pixels: int = DEFAULT_MIN_PIXELS
    processor: VisionProcessor = field(default_factory=VisionProcessor)

    def __post_init__(self) -> None:
        for name, value in (
            ("image_max_pixels", self.max_pixels),
            ("image_min_pixels", self.min_pixels),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise QwenftError(f"{name} must be a positive whole number, got {value!r}")
        if self.max_pixels < self.min_pixels:
            raise QwenftError(
                f"image_max_pixels {self.max_pixels} is below image_min_pixels {self.min_pixels} "
                "(LLaMA-Factory refuses it)",
                "raise --image-max-pixels or lower --image-min-pixels",
            )

    @classmethod
    def from_config(
        cls, config: dict[str, Any], model_dir: Path | str | None = None
    ) -> ImageTokens:
        """Those of a train.yaml's values (image_max_pixels, image_min_pixels) and a model folder."""
        return cls(
            max_pixels=int(config.get("image_max_pixels") or DEFAULT_MAX_PIXELS),
            min_pixels=int(config.get("image_min_pixels") or DEFAULT_MIN_PIXELS),
            processor=VisionProcessor.from_model(model_dir),
        )

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) the model sees an image of this size at."""
        w, h = lf_image_size(width, height, self.max_pixels, self.min_pixels)
        p = self.processor
        h, w = smart_resize(h, w, p.factor, p.min_pixels, p.max_pixels)
        return w, h

    def of_size(self, width: int, height: int) -> int:
        """The tokens (<|image_pad|>) of an image of this size."""
        w, h = self.resized(width, height)
        p = self.processor
        return (h // p.patch_size) * (w // p.patch_size) // (p.merge_size**2)

    def counts(self, row: dict, data_dir: Path | str) -> list[int]:
        """The tokens of each image of a row, in order (image files read for their size)."""
        return [self.of_size(*image_size(path)) for path in image_paths(row, data_dir)]

    def expand(self, row: dict, data_dir: Path | str) -> dict:
        """The row as LLaMA-Factory's Qwen2VLPlugin.process_messages makes it before the template:
        each <image> (in order, across the messages) replaced by the image's vision tokens. A row
        without images comes back as it is."""
        if not row.get(IMAGES):
            return row
        return expand_placeholders(row, self.counts(row, data_dir))

    def describe(self) -> str:
        return (
            f"image_max_pixels {self.max_pixels}, image_min_pixels {self.min_pixels}; "
            f"{self.processor.describe()}"
        )


def image_tokens(
    width: int,
    height: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    processor: VisionProcessor | None = None,
) -> int:
    """The tokens of one image of width x height (Qwen2-VL's image processor by default)."""
    return ImageTokens(max_pixels, min_pixels, processor or VisionProcessor()).of_size(
        width, height
    )


def image_token_counts(
    row: dict,
    data_dir: Path | str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    processor: VisionProcessor | None = None,
) -> list[int]:
    """The tokens of each image of a row (paths relative to data_dir), in order."""
    return ImageTokens(max_pixels, min_pixels, processor or VisionProcessor()).counts(row, data_dir)


def vision_text(tokens: int) -> str:
    """What one <image> becomes: <|vision_start|>, the image's tokens, <|vision_end|>."""
    return VISION_START + IMAGE_PAD * tokens + VISION_END


def expand_placeholders(row: dict, counts: list[int]) -> dict:
    """A copy of row whose messages have each <image> (in order) replaced by vision_text of its
    count; QwenftError when the placeholders and counts differ in number."""
    pending = iter(counts)
    messages = []
    for m in row.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str) and IMAGE_PLACEHOLDER in content:
            pieces = content.split(IMAGE_PLACEHOLDER)
            out = [pieces[0]]
            for piece in pieces[1:]:
                n = next(pending, None)
                if n is None:
                    raise QwenftError(f"more {IMAGE_PLACEHOLDER} placeholders than images in a row")
                out += [vision_text(n), piece]
            m = {**m, "content": "".join(out)}
        messages.append(m)
    if next(pending, None) is not None:
        raise QwenftError(f"more images than {IMAGE_PLACEHOLDER} placeholders in a row")
    return {**row, "messages": messages}


# --------------------------------------------------------------------------------------------------
# the image files


class ImageProblem(Exception):
    """Why an image of a row cannot be trained: kind (a Problem kind) and message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


def most_images(path: Path | str) -> int:
    """The most images one row of a data file holds (0: none)."""
    path, fh, mode = open_data_file(Path(path))
    most = 0
    with fh:
        for _line, value, _raw in iter_rows(fh, mode, Collector()):
            if value is not BAD and isinstance(value, dict):
                refs = value.get(IMAGES)
                most = max(most, len(refs) if isinstance(refs, list) else int(bool(refs)))
    return most


def media_dir(data: Path | str) -> str:
    """The folder train.yaml's media_dir must be for this data file: its own (qwenft's images are
    relative to it; LLaMA-Factory's default, dataset_dir, is qwenft's dataset registry)."""
    return str(Path(data).expanduser().absolute().parent)


def reference_problem(ref: Any) -> ImageProblem | None:
    """What is wrong with an entry of a row's images as written (before the file is looked at):
    not a path, or a URL (remote, data: or file:)."""
    if not isinstance(ref, str) or not ref.strip():
        shown = json.dumps(ref, ensure_ascii=False)[:60]
        return ImageProblem("bad_images", f"an image must be a path (a string), got {shown}")
    if _REMOTE_RE.match(ref):
        return ImageProblem("remote_image", f"{_short(ref)} is a remote image: {REMOTE_WHY}")
    if ref.lower().startswith("data:"):
        return ImageProblem(
            "image_url",
            f"{_short(ref)} is a data URL: LLaMA-Factory reads image files; `qwenft data convert` "
            "writes data URLs out as files",
        )
    if ref.lower().startswith("file:"):
        return ImageProblem(
            "image_url",
            f"{_short(ref)} is a file URL: LLaMA-Factory reads paths; give the path "
            "(`qwenft data convert` turns file:// URLs into paths)",
        )
    return None


def resolve_image(ref: str, data_dir: Path | str) -> Path:
    """Where an image path of a row points: as it is when absolute, else inside data_dir."""
    path = Path(ref).expanduser()
    return path if path.is_absolute() else Path(data_dir) / path


def rebase(row: Any, src_dir: Path | str, out_dir: Path | str) -> Any:
    """The row as a file in out_dir must hold it when it comes from a file in src_dir: its
    relative image paths made absolute (they are relative to their file's folder) when the two
    folders differ; the row itself when nothing changes."""
    refs = row.get(IMAGES) if isinstance(row, dict) else None
    if not isinstance(refs, list):
        return row
    new = [rebase_path(ref, src_dir, out_dir) for ref in refs]
    return row if new == refs else {**row, IMAGES: new}


def rebase_path(ref: Any, src_dir: Path | str, out_dir: Path | str) -> Any:
    """An image path of a file in src_dir as a file in out_dir holds it: a relative one made
    absolute when the folders differ; anything else (absolute, a URL, not a path) as it is."""
    if reference_problem(ref) is not None or Path(ref).expanduser().is_absolute():
        return ref
    src = os.path.abspath(src_dir)
    return ref if src == os.path.abspath(out_dir) else os.path.normpath(os.path.join(src, ref))


def image_paths(row: dict, data_dir: Path | str) -> list[Path]:
    """The files of a row's images (none for a row without them); QwenftError for an entry that is
    not a local path."""
    refs = row.get(IMAGES) or []
    if isinstance(refs, str):
        refs = [refs]
    out = []
    for ref in refs:
        problem = reference_problem(ref)
        if problem is not None:
            raise QwenftError(problem.message, "check the data first: qwenft data check FILE")
        out.append(resolve_image(ref, data_dir))
    return out


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise QwenftError(
            "reading images needs Pillow, which is not installed",
            "pip install pillow (LLaMA-Factory's requirements install it: qwenft[train])",
        ) from None
    return Image


def undecodable(source: Path | IO[bytes]) -> str | None:
    """Why an image (a file, or a stream of its bytes) does not decode, or None: Pillow's verify,
    the image's structure with PNG checksums included (what serve checks an uploaded image with,
    and verify_image a file)."""
    Image = _pil()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: LF opens it all the same
            with Image.open(source) as im:
                im.verify()
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the image's
        return str(exc) or type(exc).__name__
    return None


def verify_image(path: Path) -> tuple[int, int]:
    """(width, height) of an image file that exists and decodes (undecodable); ImageProblem
    otherwise."""
    Image = _pil()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ImageProblem("image_missing", f"image {path} {what}")
    why = undecodable(path)
    if why:
        raise ImageProblem(
            "image_unreadable",
            f"image {path} cannot be decoded ({why}): LLaMA-Factory would fail on it",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as im:
            size = im.size
    if not size[0] or not size[1]:
        raise ImageProblem("image_unreadable", f"image {path} is empty ({size[0]}x{size[1]})")
    return size


@functools.lru_cache(maxsize=65536)
def _size_of(path: str, mtime_ns: int, bytes_: int) -> tuple[int, int]:
    Image = _pil()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as im:
            return im.size


def image_size(path: Path | str) -> tuple[int, int]:
    """(width, height) of an image file, from its header (cached while the file is unchanged);
    QwenftError when it cannot be read."""
    try:
        st = os.stat(path)
        return _size_of(str(path), st.st_mtime_ns, st.st_size)
    except QwenftError:
        raise
    except Exception as exc:  # noqa: BLE001 - missing or undecodable: the data's problem
        raise QwenftError(
            f"cannot read image {path}: {exc}", "check the data first: qwenft data check FILE"
        ) from None


def placeholder_count(text: Any) -> int:
    return text.count(IMAGE_PLACEHOLDER) if isinstance(text, str) else 0


def _short(ref: str, n: int = 60) -> str:
    return ref if len(ref) <= n else ref[: n - 3] + "..."


# --------------------------------------------------------------------------------------------------
# what a file's images add up to


@dataclass
class ImageStats:
    """The images of a file's valid rows: how many, their sizes (the smallest and largest by
    pixels) and their tokens at the settings `tokens` describes."""

    settings: str = ""  # ImageTokens.describe() of the counts
    n_rows: int = 0  # rows with images
    n_images: int = 0
    smallest: tuple[int, int] | None = None  # (width, height)
    largest: tuple[int, int] | None = None
    min_tokens: int = 0
    max_tokens: int = 0
    tokens: int = 0  # all images' tokens together

    def add(self, size: tuple[int, int], tokens: int) -> None:
        if self.smallest is None or size[0] * size[1] < self.smallest[0] * self.smallest[1]:
            self.smallest = size
        if self.largest is None or size[0] * size[1] > self.largest[0] * self.largest[1]:
            self.largest = size
        self.min_tokens = tokens if not self.n_images else min(self.min_tokens, tokens)
        self.max_tokens = max(self.max_tokens, tokens)
        self.n_images += 1
        self.tokens += tokens

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("smallest", "largest"):
            out[key] = list(out[key]) if out[key] else None
        return out

    def line(self) -> str:
        """One line of `data check`'s report."""
        if not self.n_images:
            return "images: none readable"
        (w0, h0), (w1, h1) = self.smallest or (0, 0), self.largest or (0, 0)
        return (
            f"images: {self.n_images} in {self.n_rows} row{'s' if self.n_rows != 1 else ''}, "
            f"{w0}x{h0} to {w1}x{h1}, {self.min_tokens} to {self.max_tokens} tokens each "
            f"({self.tokens} in all; {self.settings})"
        )


# --------------------------------------------------------------------------------------------------
# the image rules of a row

_ROLE_WHY = {
    SYSTEM: "LLaMA-Factory expands placeholders in the conversation's turns only, so the system "
    "prompt would keep the text <image> and the image would go unmatched",
    ASSISTANT: "LLaMA-Factory would expand it inside the answer and train the image's tokens as "
    "text for the model to write",
    FUNCTION_CALL: "LLaMA-Factory would expand it inside the call and train the image's tokens as "
    "text for the model to write",
}


class ImageRules:
    """The media rules of one file's rows (qwenft.data.kinds.RowRules calls check() for each row):
    videos and audios refused, images only in sft rows, as a list of local paths, one <image> per
    image in the user (or tool) turns; with data_dir, each image file must exist and decode, and
    its size and tokens go into stats. Files are read once however many rows name them."""

    def __init__(self, col: Collector, data_dir: Path | None, tokens: ImageTokens) -> None:
        self.col = col
        self.data_dir = data_dir
        self.tokens = tokens
        self.stats = ImageStats(settings=tokens.describe())
        self.rows_with_images = 0  # rows with a non-empty images list, valid or not
        self._files: dict[Path, tuple[int, int] | ImageProblem] = {}

    def check(self, obj: dict, line: int, kind: str, raw: bytes = b"") -> None:
        """Record the media problems of one row (a dict) of a file of this kind (raw: its JSON
        text, when there is one: a row without "<image>" in it is not searched for one)."""
        col = self.col
        for key in REFUSED_MEDIA:
            if key in obj:
                if obj[key] in (None, "", []):
                    col.warning("unknown_key", line, key, f'empty "{key}" ignored')
                else:
                    col.error("multimodal", line, key, f'"{key}": {VIDEO_WHY}')
        refs = obj.get(IMAGES)
        if refs in (None, "", []):
            if raw and b"<image>" not in raw:
                return
            n = sum(placeholder_count(m.get("content")) for m in _turns(obj))
            if n:
                col.warning(
                    "placeholder_without_image",
                    line,
                    "messages",
                    f"{IMAGE_PLACEHOLDER} in a row without images: a text model reads it as "
                    "text, but LLaMA-Factory's vision-language templates fail on the row (each "
                    f"{IMAGE_PLACEHOLDER} must have its image in the row's images)",
                )
            return
        self.rows_with_images += 1
        if kind != DataKind.SFT:
            col.error("multimodal", line, IMAGES, KIND_WHY.format(kind=kind))
            return
        before = col.n_errors
        if not isinstance(refs, list):
            col.error(
                "bad_images",
                line,
                IMAGES,
                f"images must be a list of paths, got a {jtype(refs)}: LLaMA-Factory's JSON "
                'loader fails on a column whose type changes (write ["path"])',
            )
            return
        n_placed = 0
        for i, m in enumerate(_turns(obj)):
            n = placeholder_count(m.get("content"))
            if not n:
                continue
            role = m.get("role")
            if role in PLACEHOLDER_ROLES:
                n_placed += n
            elif role in _ROLE_WHY:
                col.error(
                    "image_placeholder_role",
                    line,
                    f"messages[{i}].content",
                    f"{IMAGE_PLACEHOLDER} in {'an' if role[0] in 'aeiou' else 'a'} {role} turn: "
                    f"{_ROLE_WHY[role]}; put images in "
                    "user turns",
                )
        if n_placed != len(refs):
            col.error(
                "image_count",
                line,
                IMAGES,
                f"{n_placed} {IMAGE_PLACEHOLDER} placeholder{'s' if n_placed != 1 else ''} in the "
                f"user turns but {len(refs)} image{'s' if len(refs) != 1 else ''}: LLaMA-Factory "
                f"pairs each {IMAGE_PLACEHOLDER} with the next image, in order, and fails on the "
                'row otherwise ("The number of images does not match the number of <image> '
                'tokens"); write one placeholder where each image goes',
            )
        sizes = []
        for k, ref in enumerate(refs):
            problem = reference_problem(ref)
            if problem is None and self.data_dir is not None:
                found = self._file(resolve_image(ref, self.data_dir))
                if isinstance(found, ImageProblem):
                    problem = found
                else:
                    sizes.append(found)
            if problem is not None:
                col.error(problem.kind, line, f"{IMAGES}[{k}]", problem.message)
        if col.n_errors == before and sizes:
            self.stats.n_rows += 1
            for size in sizes:
                self.stats.add(size, self.tokens.of_size(*size))

    def _file(self, path: Path) -> tuple[int, int] | ImageProblem:
        found = self._files.get(path)
        if found is None:
            try:
                found = verify_image(path)
            except ImageProblem as problem:
                found = problem
            self._files[path] = found
        return found


def _turns(obj: dict) -> list[dict]:
    msgs = obj.get("messages")
    return [m for m in msgs if isinstance(m, dict)] if isinstance(msgs, list) else []
