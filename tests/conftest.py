"""Shared test setup: the repository on sys.path and the MNIST folder the tests read."""

import os
import pathlib
import sys

import pytest

REPO_DIR = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))



def find_mnist_dir():
    """Return $MNIST_DATA_DIR, else the shared read-only copy beside the repository if it
    exists, else the repository's own data/mnist (where the scripts download to)."""
    if os.environ.get("MNIST_DATA_DIR"):
        return pathlib.Path(os.environ["MNIST_DATA_DIR"])
    shared = REPO_DIR.parent / "shared" / "mnist"
    return shared if shared.is_dir() else REPO_DIR / "data" / "mnist"


MNIST_DIR = find_mnist_dir()


@pytest.fixture(scope="session")
def mnist_dir():
    """Return the folder with the four real MNIST files, or skip the test without them."""
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    if not all((MNIST_DIR / n).exists() or (MNIST_DIR / (n + ".gz")).exists() for n in names):
        pytest.skip(f"the MNIST files are not in {MNIST_DIR}; set MNIST_DATA_DIR")
    return MNIST_DIR


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    """Return the real MNIST splits, loaded once for the whole test session."""
    import mnist_data

    return mnist_data.load_mnist(mnist_dir, download=False)
