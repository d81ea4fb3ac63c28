"""Tests for mnist_data: IDX checks on tiny files, downloads from a local server, real data.

Download and real-data tests use the real gzip files from the folder in $MNIST_DATA_DIR, else
../shared/mnist next to the repository, and are skipped when neither has them.
"""

import functools
import gzip
import hashlib
import http.server
import os
import pathlib
import shutil
import struct
import sys
import threading

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import mnist_data  # noqa: E402
from mnist_data import MnistDataError, load_mnist, read_idx, read_pair  # noqa: E402

NAMES = list(mnist_data.FILES.values())
DEAD_MIRROR = "http://127.0.0.1:1/"


def _find_real_data():
    folder = pathlib.Path(os.environ.get("MNIST_DATA_DIR") or REPO_ROOT.parent / "shared" / "mnist")
    if all((folder / name).is_file() or (folder / (name + ".gz")).is_file() for name in NAMES):
        return folder
    return None


REAL_DATA = _find_real_data()
needs_real_data = pytest.mark.skipif(
    REAL_DATA is None,
    reason="real MNIST files not found in $MNIST_DATA_DIR or ../shared/mnist beside the repository",
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    monkeypatch.delenv("MNIST_DATA_DIR", raising=False)
    monkeypatch.delenv("MNIST_MIRRORS", raising=False)


# Helpers that write tiny IDX files.

def images_idx(count=3, rows=28, cols=28, items=None):
    items = count if items is None else items
    pixels = (np.arange(items * rows * cols) % 256).astype(np.uint8)
    return struct.pack(">IIII", 0x00000803, count, rows, cols) + pixels.tobytes()


def labels_idx(labels=(1, 7, 9), count=None):
    count = len(labels) if count is None else count
    return struct.pack(">II", 0x00000801, count) + bytes(labels)


def write(path, data, compress=False):
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def copy_real_gz(target_folder, names=NAMES):
    """Copy real files into `target_folder` as NAME.gz, compressing any that are stored raw."""
    target_folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        source = REAL_DATA / (name + ".gz")
        if source.is_file():
            shutil.copyfile(source, target_folder / (name + ".gz"))
        else:
            write(target_folder / (name + ".gz"), (REAL_DATA / name).read_bytes(), compress=True)


@pytest.fixture
def serve(tmp_path):
    """Start an HTTP server on 127.0.0.1 for a folder and return (base URL, requested paths)."""
    servers = []

    def start(folder):
        requests = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                requests.append(self.path)

        handler = functools.partial(Handler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/", requests

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# read_idx and read_pair on synthetic files.

@pytest.mark.parametrize("compress", [False, True])
def test_pair_round_trip(tmp_path, compress):
    suffix = ".gz" if compress else ""
    images_path = write(tmp_path / f"x-images{suffix}", images_idx(), compress)
    labels_path = write(tmp_path / f"x-labels{suffix}", labels_idx(), compress)
    images, labels = read_pair(images_path, labels_path)
    assert images.dtype == np.uint8
    assert images.shape == (3, 28, 28)
    assert images.tobytes() == images_idx()[16:]
    assert labels.tolist() == [1, 7, 9]


def test_name_without_gz_finds_gz(tmp_path):
    write(tmp_path / "x-labels.gz", labels_idx(), compress=True)
    assert read_idx(tmp_path / "x-labels").tolist() == [1, 7, 9]


def test_raw_file_preferred_over_gz(tmp_path):
    write(tmp_path / "x-labels", labels_idx((2, 2)))
    write(tmp_path / "x-labels.gz", labels_idx((5, 5)), compress=True)
    assert read_idx(tmp_path / "x-labels").tolist() == [2, 2]


def test_gzip_detected_by_magic(tmp_path):
    gz_named_raw = write(tmp_path / "x-labels.gz", labels_idx())
    gz_without_suffix = write(tmp_path / "y-labels", labels_idx(), compress=True)
    assert read_idx(gz_named_raw).tolist() == [1, 7, 9]
    assert read_idx(gz_without_suffix).tolist() == [1, 7, 9]


def test_missing_file(tmp_path):
    with pytest.raises(MnistDataError) as error:
        read_idx(tmp_path / "x-labels")
    assert "x-labels" in str(error.value)
    assert "cannot read" in str(error.value)


def test_invalid_kind_argument(tmp_path):
    with pytest.raises(ValueError, match="'pictures'"):
        read_idx(tmp_path / "x", kind="pictures")


def check_error(path, *words, **kwargs):
    """Read `path`, expect MnistDataError, and check that it names the file and each word."""
    with pytest.raises(MnistDataError) as error:
        read_idx(path, **kwargs)
    message = str(error.value)
    assert str(path) in message
    for word in words:
        assert word in message
    return message


def test_wrong_magic(tmp_path):
    path = write(tmp_path / "x-images", b"\x00\x00\x08\x04" + images_idx()[4:])
    check_error(path, "not an IDX file", "0x00000804", "0x00000803")


def test_byte_swapped_header(tmp_path):
    data = struct.pack("<IIII", 0x00000803, 3, 28, 28) + images_idx()[16:]
    path = write(tmp_path / "x-images", data)
    check_error(path, "byte-swapped", "little-endian", "03 08 00 00")


def test_truncated_data(tmp_path):
    path = write(tmp_path / "x-images", images_idx()[:-100])
    check_error(path, "truncated", "header says 3 images", "2 whole images")


def test_header_claims_more_items(tmp_path):
    path = write(tmp_path / "x-images.gz", images_idx(count=5, items=3), compress=True)
    check_error(path, "truncated", "header says 5 images", "3 whole images")


def test_truncated_header(tmp_path):
    path = write(tmp_path / "x-images", images_idx()[:10])
    check_error(path, "truncated", "10 bytes", "16-byte header")


def test_trailing_data(tmp_path):
    path = write(tmp_path / "x-labels", labels_idx() + b"\x00\x00")
    check_error(path, "trailing data", "header says 3 labels", "13 bytes")


def test_wrong_image_size(tmp_path):
    path = write(tmp_path / "x-images", images_idx(rows=27))
    check_error(path, "27x28", "expected 28x28")


def test_label_out_of_range(tmp_path):
    path = write(tmp_path / "x-labels", labels_idx((3, 10, 4, 12)))
    check_error(path, "invalid label 10 at index 1", "0 to 9", "2 labels out of range")


def test_pair_count_mismatch(tmp_path):
    images_path = write(tmp_path / "x-images", images_idx(count=3))
    labels_path = write(tmp_path / "x-labels", labels_idx((1, 2)))
    with pytest.raises(MnistDataError) as error:
        read_pair(images_path, labels_path)
    message = str(error.value)
    assert str(images_path) in message
    assert str(labels_path) in message
    assert "3 images" in message
    assert "2 labels" in message


def test_checksum_mismatch(tmp_path):
    data = images_idx()
    good_hash = hashlib.sha256(data).hexdigest()
    changed = bytearray(data)
    changed[100] ^= 0xFF
    path = write(tmp_path / "x-images.gz", bytes(changed), compress=True)
    found_hash = hashlib.sha256(changed).hexdigest()
    message = check_error(path, "SHA-256 mismatch", expected_sha256=good_hash)
    assert f"expected {good_hash}" in message
    assert f"found {found_hash}" in message
    assert "Delete the file and rerun to download it again" in message


def test_checksum_match(tmp_path):
    data = labels_idx()
    path = write(tmp_path / "x-labels.gz", data, compress=True)
    assert read_idx(path, expected_sha256=hashlib.sha256(data).hexdigest()).tolist() == [1, 7, 9]


def test_html_page_under_gz_name(tmp_path):
    page = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>\n"
    path = write(tmp_path / "train-images-idx3-ubyte.gz", page)
    check_error(path, "looks like an HTML page", "failed download", "Delete the file")


def test_truncated_gzip(tmp_path):
    compressed = gzip.compress(images_idx())
    path = write(tmp_path / "x-images.gz", compressed[: len(compressed) // 2])
    check_error(path, "invalid or truncated gzip data", "EOFError", "Delete the file")


def test_corrupt_gzip_header(tmp_path):
    path = write(tmp_path / "x-images.gz", b"\x1f\x8b\x99" + b"\x00" * 40)
    check_error(path, "invalid or truncated gzip data", "BadGzipFile")


def test_labels_under_images_name(tmp_path):
    path = write(tmp_path / "train-images-idx3-ubyte", labels_idx())
    check_error(path, "found labels data", "0x00000801", "images data", "0x00000803")


def test_images_with_labels_kind(tmp_path):
    path = write(tmp_path / "data.bin", images_idx())
    check_error(path, "found images data", "labels data", kind="labels")


def test_double_gzip(tmp_path):
    path = write(tmp_path / "x-labels.gz", gzip.compress(gzip.compress(labels_idx())))
    check_error(path, "gzip-compressed twice", "1f 8b")


# resolve_data_dir and argument checks.

def test_data_dir_argument_first(tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_DATA_DIR", str(tmp_path / "from-env"))
    assert mnist_data.resolve_data_dir(tmp_path / "given") == tmp_path / "given"


def test_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_DATA_DIR", str(tmp_path / "from-env"))
    assert mnist_data.resolve_data_dir() == tmp_path / "from-env"


def test_data_dir_default():
    assert mnist_data.resolve_data_dir() == REPO_ROOT / "data" / "mnist"


@pytest.mark.parametrize("train_size", [0, -1, 50_001, 2.5, "100", True])
def test_invalid_train_size(tmp_path, train_size):
    with pytest.raises(ValueError) as error:
        load_mnist(tmp_path, train_size=train_size, download=False)
    assert repr(train_size) in str(error.value)
    assert "1 to 50000" in str(error.value)


def test_missing_without_download(tmp_path):
    with pytest.raises(MnistDataError) as error:
        load_mnist(tmp_path, download=False)
    message = str(error.value)
    assert str(tmp_path) in message
    for name in NAMES:
        assert name in message
    assert "MNIST_DATA_DIR" in message
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_before_download(tmp_path, serve):
    # mkdir under a regular file fails even for root, unlike a chmod 0o555 folder.
    (tmp_path / "afile").write_text("not a folder")
    folder = tmp_path / "afile" / "mnist"
    base, requests = serve(tmp_path)
    with pytest.raises(MnistDataError) as error:
        load_mnist(folder, mirrors=[base])
    message = str(error.value)
    assert str(folder) in message
    assert "cannot create or write the data folder" in message
    assert "MNIST_DATA_DIR" in message
    assert requests == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root can write to a chmod 0o555 folder")
def test_read_only_folder_before_download(tmp_path, serve):
    folder = tmp_path / "mnist"
    folder.mkdir()
    folder.chmod(0o555)
    base, requests = serve(tmp_path)
    try:
        with pytest.raises(MnistDataError, match="cannot create or write the data folder"):
            load_mnist(folder, mirrors=[base])
    finally:
        folder.chmod(0o755)
    assert requests == []


# Downloads from a local server, with the real files.

@needs_real_data
def test_download_after_dead_mirror(tmp_path, serve):
    served = tmp_path / "served"
    copy_real_gz(served)
    base, requests = serve(served)
    folder = tmp_path / "data" / "mnist"
    splits = load_mnist(folder, train_size=100, mirrors=[DEAD_MIRROR, base])
    assert sorted(path.name for path in folder.iterdir()) == sorted(name + ".gz" for name in NAMES)
    for name in NAMES:
        assert (folder / (name + ".gz")).read_bytes() == (served / (name + ".gz")).read_bytes()
    assert sorted(requests) == sorted(f"/{name}.gz" for name in NAMES)
    assert splits.train_images.shape == (100, 28, 28, 1)


@needs_real_data
def test_download_only_missing_file(tmp_path, serve, monkeypatch):
    served = tmp_path / "served"
    copy_real_gz(served, ["t10k-labels-idx1-ubyte"])
    base, requests = serve(served)
    monkeypatch.setenv("MNIST_MIRRORS", f"{DEAD_MIRROR} {base}")
    folder = tmp_path / "mnist"
    copy_real_gz(folder, NAMES[:3])
    load_mnist(folder, train_size=10)
    assert requests == ["/t10k-labels-idx1-ubyte.gz"]
    assert (folder / "t10k-labels-idx1-ubyte.gz").is_file()
    assert len(list(folder.iterdir())) == 4


@needs_real_data
def test_damaged_download_leaves_nothing(tmp_path, serve):
    name = "t10k-labels-idx1-ubyte"
    served = tmp_path / "served"
    served.mkdir()
    copy_real_gz(served, [name])
    labels = bytearray(gzip.decompress((served / (name + ".gz")).read_bytes()))
    labels[8] = (labels[8] + 1) % 10  # A valid label, so only the checksum can catch it.
    write(served / (name + ".gz"), bytes(labels), compress=True)
    base, _ = serve(served)
    folder = tmp_path / "mnist"
    copy_real_gz(folder, NAMES[:3])
    before = sorted(path.name for path in folder.iterdir())
    with pytest.raises(MnistDataError) as error:
        load_mnist(folder, mirrors=[base])
    message = str(error.value)
    assert f"{base}{name}.gz" in message
    assert "SHA-256 mismatch" in message
    assert sorted(path.name for path in folder.iterdir()) == before


def test_oversized_download_rejected(tmp_path, serve, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    (served / "train-images-idx3-ubyte.gz").write_bytes(b"\x00" * 100)
    base, _ = serve(served)
    monkeypatch.setattr(mnist_data, "MAX_FILE_BYTES", 10)
    folder = tmp_path / "mnist"
    with pytest.raises(MnistDataError) as error:
        load_mnist(folder, mirrors=[base])
    assert "larger than 10 bytes" in str(error.value)
    assert list(folder.iterdir()) == []


def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch):
    class InterruptedResponse:
        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

        def read(self, size):
            raise KeyboardInterrupt

    monkeypatch.setattr(mnist_data.urllib.request, "urlopen",
                        lambda url, timeout: InterruptedResponse())
    folder = tmp_path / "mnist"
    with pytest.raises(KeyboardInterrupt):
        load_mnist(folder, mirrors=["http://127.0.0.1:1/"])
    assert list(folder.iterdir()) == []


def test_all_mirrors_dead(tmp_path, monkeypatch):
    second_dead = "http://127.0.0.1:9/mnist"
    monkeypatch.setenv("MNIST_MIRRORS", f"{DEAD_MIRROR} {second_dead}")
    folder = tmp_path / "mnist"
    with pytest.raises(MnistDataError) as error:
        load_mnist(folder)
    message = str(error.value)
    assert f"{DEAD_MIRROR}train-images-idx3-ubyte.gz" in message
    assert f"{second_dead}/train-images-idx3-ubyte.gz" in message
    assert "could not download" in message
    assert str(folder) in message
    assert "MNIST_DATA_DIR" in message
    for name in NAMES:
        assert name in message
    assert list(folder.iterdir()) == []


def test_default_mirrors_listed():
    assert len(mnist_data.DEFAULT_MIRRORS) >= 2
    assert mnist_data.DEFAULT_MIRRORS[-1] == "http://yann.lecun.com/exdb/mnist/"


# Real data.

@pytest.fixture(scope="module")
def real_splits():
    return load_mnist(REAL_DATA, download=False)


@needs_real_data
def test_real_shapes_and_types(real_splits):
    assert real_splits.train_images.shape == (50_000, 28, 28, 1)
    assert real_splits.validation_images.shape == (10_000, 28, 28, 1)
    assert real_splits.test_images.shape == (10_000, 28, 28, 1)
    assert real_splits.train_labels.shape == (50_000,)
    assert real_splits.validation_labels.shape == (10_000,)
    assert real_splits.test_labels.shape == (10_000,)
    splits = real_splits
    for images in (splits.train_images, splits.validation_images, splits.test_images):
        assert images.dtype == np.float32
        assert images.min() == 0.0
        assert images.max() == 1.0
    for labels in (splits.train_labels, splits.validation_labels, splits.test_labels):
        assert labels.dtype == np.int32


@needs_real_data
def test_real_label_counts(real_splits):
    all_training = np.concatenate([real_splits.train_labels, real_splits.validation_labels])
    assert np.bincount(all_training).tolist() == [5923, 6742, 5958, 6131, 5842,
                                                  5421, 5918, 6265, 5851, 5949]
    assert np.bincount(real_splits.test_labels).tolist() == [980, 1135, 1032, 1010, 982,
                                                             892, 958, 1028, 974, 1009]


@needs_real_data
def test_real_pixel_mean(real_splits):
    all_training = np.concatenate([real_splits.train_images, real_splits.validation_images])
    assert abs(float(all_training.mean(dtype=np.float64)) - 0.1307) < 1e-3


@needs_real_data
def test_real_train_size(real_splits):
    small = load_mnist(REAL_DATA, train_size=2000, download=False)
    assert small.train_images.shape == (2000, 28, 28, 1)
    assert np.array_equal(small.train_images, real_splits.train_images[:2000])
    assert np.array_equal(small.train_labels, real_splits.train_labels[:2000])
    assert np.array_equal(small.validation_images, real_splits.validation_images)
    assert np.array_equal(small.validation_labels, real_splits.validation_labels)


@needs_real_data
def test_read_only_folder_loads(tmp_path):
    folder = tmp_path / "mnist"
    copy_real_gz(folder)
    before = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    folder.chmod(0o555)
    try:
        splits = load_mnist(folder, train_size=10, mirrors=[DEAD_MIRROR])
    finally:
        folder.chmod(0o755)
    assert splits.test_labels.shape == (10_000,)
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == before
