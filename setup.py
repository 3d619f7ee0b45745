"""Build of edropout's kernels: the CPU kernels always, the CUDA kernels where a GPU and a CUDA toolkit are
found, or with FORCE_CUDA=1 (and CUDA_HOME, the toolkit's folder). ``pip install .`` builds against the
torch that build isolation installs (pyproject.toml); ``pip install --no-build-isolation .`` against the
torch already installed. What the kernels must match at run time is written beside them
(edropout/_built_with.json) and checked at ``import edropout``."""

import glob
import json
import os
import shlex
import sys
import sysconfig

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit("edropout: torch is not importable at build time; `pip install .` installs it for the build "
             "(pyproject.toml); with --no-build-isolation, install torch first")

CUDA_ARCHITECTURES = "8.0;9.0"  # without a GPU to ask and no TORCH_CUDA_ARCH_LIST: A100 and H100/H200


def built_with() -> dict:
    """What an extension built now must find at run time: the torch it links against (version with its local
    tag), its CUDA and its C++ ABI."""
    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI)}


class BuildKernels(BuildExtension):
    """torch's BuildExtension, which also writes _built_with.json beside the extension, and turns a failed
    compile into one last line (the compiler's own output stays above it)."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001  (distutils, subprocess and ninja raise different kinds)
            cuda = any(source.endswith(".cu") for source in ext.sources)
            sys.exit(f"edropout: the {'CUDA and CPU' if cuda else 'CPU'} kernels failed to compile ({type(e).__name__}); "
                     f"the compiler's messages are above")
        path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), "_built_with.json")
        with open(path, "w") as f:
            json.dump({**built_with(), "cuda_kernels": any(s.endswith(".cu") for s in ext.sources)}, f)

def host_compiler():
    """The compiler of the .cpp files. nvcc must compile the .cu files' host code with it too: both include
    the same inline code (ATen, the argument checks), and the linker keeps one copy of each, so copies from
    two different compilers would be mixed in one library."""
    return shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")[0]


def extension():
    sources = [os.path.join("csrc", "edropout.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    forced = os.environ.get("FORCE_CUDA") == "1"
    if forced and (CUDA_HOME is None or not os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc"))):
        sys.exit(f"edropout: FORCE_CUDA=1 needs a CUDA toolkit; CUDA_HOME is {CUDA_HOME!r}, which has no bin/nvcc "
                 f"(set CUDA_HOME to the toolkit's folder, e.g. /usr/local/cuda)")
    with_cuda = CUDA_HOME is not None and (torch.cuda.is_available() or forced)
    debug = os.environ.get("DEBUG") == "1"
    cxx_flags = ["-O0" if debug else "-O3", "-fopenmp"] + (["-g"] if debug else [])
    if not with_cuda:
        return CppExtension("edropout._C", sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=["-fopenmp"])
    if not torch.cuda.is_available():  # no GPU to ask which architecture: the named ones, not all of them
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCHITECTURES)
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
    cmdclass={"build_ext": BuildKernels},
)
