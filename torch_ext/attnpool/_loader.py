"""Loads attnpool._C, which registers the torch.ops.attnpool operators."""

import importlib


def load_native_library():
    import torch  # noqa: F401  (libtorch must be loaded before the extension)

    try:
        return importlib.import_module("attnpool._C")
    except ImportError as error:
        raise ImportError(
            "attnpool's native library attnpool._C could not be loaded "
            f"({error}). Build it against the installed torch with "
            "`pip install --no-build-isolation -e .` from the repository root "
            "(it must be rebuilt whenever torch is upgraded)."
        ) from error
