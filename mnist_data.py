"""Load MNIST from the four standard IDX files, check them and split them for training.

The data is the MNIST database of handwritten digits (Yann LeCun, Corinna Cortes and Christopher
J.C. Burges, CC BY-SA 3.0) as the four IDX files of the original distribution. They are read from
the data folder that `resolve_data_dir` returns, each gzip-compressed (`NAME.gz`) or not (`NAME`).
Missing files are downloaded from public mirrors (`DEFAULT_MIRRORS`, tried in order). Every file
is checked against the SHA-256 of its decompressed bytes, because mirrors may compress the same
data differently.

Split: training is the first 50,000 of the 60,000 training images, validation is the last 10,000,
and test is the 10,000 t10k images. Images come back as float32 in [0, 1] with shape
[N, 28, 28, 1], and labels as int32 with shape [N].

This module imports only the standard library and numpy.
"""

import gzip
import hashlib
import http.client
import io
import logging
import os
import pathlib
import struct
import tempfile
import urllib.request
import zlib
from typing import NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# SHA-256 of the decompressed bytes of each file, keyed by file name.
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# Base URLs that serve the four files as NAME.gz. The original site comes last because it serves
# plain HTTP only.
DEFAULT_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

TRAIN_SIZE = 50_000
VALIDATION_SIZE = 10_000

DATA_DIR_ENV = "MNIST_DATA_DIR"
MIRRORS_ENV = "MNIST_MIRRORS"

IMAGE_ROWS = 28
IMAGE_COLS = 28
MAGIC = {"images": 0x00000803, "labels": 0x00000801}
GZIP_MAGIC = b"\x1f\x8b"

# The largest file, train-images, is 47,040,016 bytes decompressed and under 10 MB as gzip, so
# this cap stops a runaway download or a gzip bomb without rejecting a real file.
MAX_FILE_BYTES = 64 * 1024 * 1024
DOWNLOAD_TIMEOUT_SECONDS = 30

REDOWNLOAD_FIX = "Delete the file and rerun to download it again, or copy a correct one."


class MnistDataError(Exception):
    """A data file that is missing, damaged or of the wrong kind, or a failed download."""


class MnistSplits(NamedTuple):
    """The three splits: images float32 [N, 28, 28, 1] in [0, 1], labels int32 [N]."""

    train_images: np.ndarray
    train_labels: np.ndarray
    validation_images: np.ndarray
    validation_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def resolve_data_dir(data_dir=None):
    """Return `data_dir`, else $MNIST_DATA_DIR, else the data/mnist folder beside this file."""
    if data_dir is not None:
        return pathlib.Path(data_dir).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV, "")
    if from_env:
        return pathlib.Path(from_env).expanduser()
    return pathlib.Path(__file__).resolve().parent / "data" / "mnist"


def _error(source, problem, fix):
    message = f"{source}: {problem}."
    if fix:
        message += " " + fix
    return MnistDataError(message)


def _decompress(raw, source, fix):
    """Return the IDX bytes of `raw`, decompressing it when it starts with the gzip magic bytes."""
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except (OSError, EOFError, zlib.error) as error:
        # Python's gzip raises BadGzipFile (an OSError) for a bad header or CRC, EOFError when
        # the stream ends early, and zlib.error for corrupt deflate data.
        problem = f"invalid or truncated gzip data ({type(error).__name__}: {error})"
        raise _error(source, problem, fix) from error
    if len(data) > MAX_FILE_BYTES:
        raise _error(source, f"decompresses to more than {MAX_FILE_BYTES} bytes", fix)
    if data[:2] == GZIP_MAGIC:
        problem = ("the file is gzip-compressed twice: after one decompression it still starts "
                   "with the gzip magic bytes 1f 8b, expected an IDX header")
        raise _error(source, problem, fix)
    return data


def _parse_idx(data, source, kind, fix):
    """Check the IDX header and size of `data` and return its uint8 array."""
    if data[:1024].lstrip()[:1] == b"<":
        problem = ("the file looks like an HTML page, not IDX data. It is probably the error "
                   "page of a failed download")
        raise _error(source, problem, fix)
    if len(data) < 4:
        problem = f"the file is truncated: {len(data)} bytes, shorter than an IDX header"
        raise _error(source, problem, fix)

    magic = struct.unpack(">I", data[:4])[0]
    found_kind = next((name for name, value in MAGIC.items() if value == magic), None)
    if found_kind is None:
        swapped = struct.unpack("<I", data[:4])[0]
        if swapped in MAGIC.values():
            problem = (f"the header is byte-swapped (little-endian): magic bytes "
                       f"{data[:4].hex(' ')}, expected 0x{swapped:08x} stored big-endian, "
                       f"as IDX requires")
        else:
            problem = (f"not an IDX file: magic number 0x{magic:08x}, expected 0x00000803 "
                       f"(images) or 0x00000801 (labels)")
        raise _error(source, problem, fix)
    if kind is not None and found_kind != kind:
        problem = (f"found {found_kind} data (magic 0x{magic:08x}) where {kind} data (magic "
                   f"0x{MAGIC[kind]:08x}) was expected. Check that the file names are not swapped")
        raise _error(source, problem, fix)

    ndim = 3 if found_kind == "images" else 1
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        problem = (f"the file is truncated: {len(data)} bytes, shorter than its "
                   f"{header_size}-byte header")
        raise _error(source, problem, fix)
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    if found_kind == "images" and shape[1:] != (IMAGE_ROWS, IMAGE_COLS):
        problem = f"images are {shape[1]}x{shape[2]}, expected {IMAGE_ROWS}x{IMAGE_COLS}"
        raise _error(source, problem, fix)

    count = shape[0]
    item_size = IMAGE_ROWS * IMAGE_COLS if found_kind == "images" else 1
    expected_size = header_size + count * item_size
    if len(data) < expected_size:
        whole_items = (len(data) - header_size) // item_size
        problem = (f"the file is truncated: the header says {count} {found_kind} "
                   f"({expected_size} bytes), but the file has {len(data)} bytes, "
                   f"{whole_items} whole {found_kind}")
        raise _error(source, problem, fix)
    if len(data) > expected_size:
        problem = (f"trailing data: the header says {count} {found_kind} ({expected_size} bytes), "
                   f"but the file has {len(data)} bytes")
        raise _error(source, problem, fix)

    array = np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape).copy()
    if found_kind == "labels":
        bad = np.flatnonzero(array > 9)
        if bad.size:
            index = int(bad[0])
            problem = (f"invalid label {array[index]} at index {index}, expected 0 to 9 "
                       f"({bad.size} labels out of range)")
            raise _error(source, problem, fix)
    return array


def _decode(raw, source, expected_sha256, kind, fix):
    data = _decompress(raw, source, fix)
    array = _parse_idx(data, source, kind, fix)
    if expected_sha256 is not None:
        found = hashlib.sha256(data).hexdigest()
        if found != expected_sha256.lower():
            problem = (f"SHA-256 mismatch of the decompressed data: expected {expected_sha256}, "
                       f"found {found}")
            raise _error(source, problem, fix)
    return array


def _find_file(folder, name):
    """Return folder/NAME if it exists, else folder/NAME.gz if that exists, else None."""
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _kind_from_name(name):
    if "images" in name:
        return "images"
    if "labels" in name:
        return "labels"
    return None


def read_idx(path, expected_sha256=None, kind=None):
    """Read one IDX file, gzip-compressed or not, and return its uint8 array after all checks.

    `path` may name NAME or NAME.gz. When NAME does not exist, NAME.gz is read in its place.
    `kind` is "images" (returns [N, 28, 28]) or "labels" (returns [N]). When it is None, it
    follows from "images" or "labels" in the file name, and other names accept either kind.
    Raises MnistDataError for any missing, unreadable or invalid file.
    """
    path = pathlib.Path(path)
    if kind not in (None, "images", "labels"):
        raise ValueError(f"kind must be 'images', 'labels' or None, got {kind!r}")
    if not path.is_file() and path.suffix != ".gz" and path.with_name(path.name + ".gz").is_file():
        path = path.with_name(path.name + ".gz")
    if kind is None:
        kind = _kind_from_name(path.name)

    try:
        with open(path, "rb") as stream:
            raw = stream.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        problem = f"cannot read the file ({error})"
        raise _error(path, problem, "Check the path, or point --data-dir or MNIST_DATA_DIR at "
                                    "the folder with the MNIST files.") from error
    if len(raw) > MAX_FILE_BYTES:
        raise _error(path, f"the file is larger than {MAX_FILE_BYTES} bytes", REDOWNLOAD_FIX)
    return _decode(raw, path, expected_sha256, kind, REDOWNLOAD_FIX)


def read_pair(images_path, labels_path, images_sha256=None, labels_sha256=None):
    """Read an images file and a labels file and check that their item counts match."""
    images = read_idx(images_path, images_sha256, kind="images")
    labels = read_idx(labels_path, labels_sha256, kind="labels")
    if len(images) != len(labels):
        problem = (f"{len(images)} images in {images_path} but {len(labels)} labels in "
                   f"{labels_path}, expected the same number")
        raise MnistDataError(problem + ". Use the images and labels of the same set, or delete "
                             "both files and rerun to download them again.")
    return images, labels


def _manual_fix(folder):
    names = ", ".join(FILES.values())
    return (f"Put the files {names} (each gzip-compressed as NAME.gz or not) in {folder} by "
            f"hand, or point --data-dir or the {DATA_DIR_ENV} environment variable at a folder "
            f"that contains them.")


def _mirror_list(mirrors):
    if mirrors is None:
        mirrors = os.environ.get(MIRRORS_ENV, "").split() or DEFAULT_MIRRORS
    elif isinstance(mirrors, str):
        mirrors = mirrors.split()
    bases = [base if base.endswith("/") else base + "/" for base in mirrors]
    if not bases:
        raise ValueError("mirrors is empty. Pass at least one base URL, or None for the defaults")
    return bases


def _check_writable(folder, missing):
    """Create `folder` if needed and raise MnistDataError unless a file can be created in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A real file creation, not os.access, because os.access reports every folder as
        # writable for root.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise MnistDataError(
            f"{folder}: cannot create or write the data folder ({error}), so the missing "
            f"files {', '.join(missing)} cannot be downloaded. Point --data-dir or "
            f"{DATA_DIR_ENV} at a writable folder, or put the files in {folder} by hand."
        ) from error


def _fetch_verified(url, target, name):
    """Download `url`, check it fully and rename it to `target`, leaving no partial file behind."""
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part",
                                             dir=target.parent)
    temp_path = pathlib.Path(temp_name)
    placed = False
    try:
        with os.fdopen(descriptor, "wb") as temp_file:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:
                size = 0
                while chunk := response.read(1 << 20):
                    size += len(chunk)
                    if size > MAX_FILE_BYTES:
                        raise _error(url, f"the response is larger than {MAX_FILE_BYTES} bytes", "")
                    temp_file.write(chunk)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        _decode(temp_path.read_bytes(), url, SHA256[name], _kind_from_name(name), "")
        os.replace(temp_path, target)
        placed = True
    finally:
        # This also runs on KeyboardInterrupt, so an interrupted download leaves no temp file.
        if not placed:
            temp_path.unlink(missing_ok=True)


def _download(name, folder, mirrors):
    """Download NAME.gz into `folder` from the first mirror that serves a valid copy."""
    target = folder / (name + ".gz")
    failures = []
    for base in mirrors:
        url = base + name + ".gz"
        logger.info("Downloading %s to %s", url, target)
        try:
            _fetch_verified(url, target, name)
            return
        except (MnistDataError, OSError, ValueError, http.client.HTTPException) as error:
            # urllib.error.URLError and socket timeouts are OSErrors, and ValueError means an
            # invalid URL.
            logger.warning("Download of %s failed: %s", url, error)
            failures.append(f"  {url}: {type(error).__name__}: {error}")
    raise MnistDataError(
        f"{target}: could not download {name}.gz from any mirror. URLs tried:\n"
        + "\n".join(failures) + "\n" + _manual_fix(folder)
        + f" To try other mirrors, set {MIRRORS_ENV} to space-separated base URLs."
    )


def _check_train_size(train_size):
    if train_size is None:
        return TRAIN_SIZE
    if isinstance(train_size, bool) or not isinstance(train_size, (int, np.integer)) \
            or not 1 <= train_size <= TRAIN_SIZE:
        raise ValueError(f"train_size must be an integer from 1 to {TRAIN_SIZE}, got "
                         f"{train_size!r}. Pass None to use all {TRAIN_SIZE} training images")
    return int(train_size)


def _scale(images):
    return (images.astype(np.float32) / np.float32(255))[..., np.newaxis]


def load_mnist(data_dir=None, train_size=None, download=True, mirrors=None):
    """Load, check and split MNIST, downloading missing files first when `download` is true.

    `train_size` keeps only the first `train_size` of the 50,000 training images, and the
    validation set stays the same. `mirrors` overrides $MNIST_MIRRORS and DEFAULT_MIRRORS. When
    all four files are present, nothing is written to the data folder, so it may be read-only.
    """
    train_size = _check_train_size(train_size)
    folder = resolve_data_dir(data_dir)
    missing = [name for name in FILES.values() if _find_file(folder, name) is None]
    if missing:
        if not download:
            raise MnistDataError(f"{folder}: missing {', '.join(missing)}, and downloading is "
                                 f"off. " + _manual_fix(folder))
        _check_writable(folder, missing)
        bases = _mirror_list(mirrors)
        for name in missing:
            _download(name, folder, bases)

    def pair(images_key, labels_key):
        images_name, labels_name = FILES[images_key], FILES[labels_key]
        return read_pair(_find_file(folder, images_name), _find_file(folder, labels_name),
                         SHA256[images_name], SHA256[labels_name])

    train_images, train_labels = pair("train_images", "train_labels")
    test_images, test_labels = pair("test_images", "test_labels")
    validation_end = TRAIN_SIZE + VALIDATION_SIZE
    return MnistSplits(
        train_images=_scale(train_images[:train_size]),
        train_labels=train_labels[:train_size].astype(np.int32),
        validation_images=_scale(train_images[TRAIN_SIZE:validation_end]),
        validation_labels=train_labels[TRAIN_SIZE:validation_end].astype(np.int32),
        test_images=_scale(test_images),
        test_labels=test_labels.astype(np.int32),
    )
