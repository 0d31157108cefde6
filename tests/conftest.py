import os
import sys

import torch

# Test helpers live beside the tests (tests/helpers.py).
sys.path.insert(0, os.path.dirname(__file__))


def pytest_report_header(config):
    import attnpool

    cuda = "built" if attnpool._C.with_cuda else "not built"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (
        f"attnpool {attnpool.__version__}: CPU kernels {attnpool._C.cpu_kernel_isa()}, "
        f"CUDA kernels {cuda}, GPU {gpu}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
