"""Build of edropout's kernels: the CPU kernels always, the CUDA kernels when a CUDA toolkit is found
(or FORCE_CUDA=1). Build against the installed torch: pip install --no-build-isolation ."""

import glob
import os
import shlex
import sys
import sysconfig

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "edropout: torch is not importable at build time; install torch first, "
        "then build against it with `pip install --no-build-isolation .`"
    )

def host_compiler():
    """The compiler of the .cpp files. nvcc must compile the .cu files' host code with it too: both include
    the same inline code (ATen, the argument checks), and the linker keeps one copy of each, so copies from
    two different compilers would be mixed in one library."""
    return shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")[0]


def extension():
    sources = [os.path.join("csrc", "edropout.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    with_cuda = CUDA_HOME is not None and (torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1")
    debug = os.environ.get("DEBUG") == "1"
    cxx_flags = ["-O0" if debug else "-O3", "-fopenmp"] + (["-g"] if debug else [])
    if not with_cuda:
        return CppExtension("edropout._C", sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=["-fopenmp"])
    nvcc_flags = ["-O3", "-lineinfo"] + (["-g", "-G"] if debug else [])
    if "CC" not in os.environ:  # with CC set, torch passes it to nvcc itself
        nvcc_flags += ["-ccbin", host_compiler()]
    return CUDAExtension(
        "edropout._C",
        sources + cuda_sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["edropout", "edropout.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
