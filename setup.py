"""Build midus_ops._C against the torch that is already installed.

    pip install torch ninja
    pip install --no-build-isolation .

With a CUDA build of torch and a CUDA toolkit this builds a CUDAExtension (C++ CPU kernels and the
CUDA kernels in csrc/cuda); with a CPU-only torch, or no toolkit, it builds the C++ CPU extension
alone and says so. Environment knobs: MIDUS_FORCE_CPU=1 (skip CUDA), CUDA_HOME,
TORCH_CUDA_ARCH_LIST (default DEFAULT_CUDA_ARCH_LIST when no GPU is visible), MAX_JOBS.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

try:
    import torch
except ImportError:
    sys.exit(
        "midus needs PyTorch installed before it is built (it compiles C++/CUDA against the torch you "
        "run).\nInstall torch first, then build without isolation:\n"
        "    pip install torch ninja\n"
        "    pip install --no-build-isolation .\n"
    )


# Without a visible GPU: SASS for sm_80 (A100; also runs on sm_86/89, the same major version) and
# sm_90 (H100), plus compute_90 PTX, which the driver JIT-compiles for newer GPUs (sm_100, sm_120)
# that have no SASS here (mma.sync and everything else the kernels use exist there too).
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _log(msg: str) -> None:
    print(f"[midus setup] {msg}", file=sys.stderr, flush=True)


def _is_real_nvcc(path: str) -> bool:
    """A real nvcc is an ELF binary; wrapper scripts (``exec .../nvcc "$@"``) mislead torch."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _toolkit_ok(root: str) -> bool:
    return (_is_real_nvcc(os.path.join(root, "bin", "nvcc"))
            and any(glob.glob(os.path.join(root, d, "libcudart.so*")) for d in ("lib64", "lib")))


def find_cuda_home():
    """The CUDA toolkit folder whose bin/ holds the real nvcc and whose lib64/ holds cudart."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        if not _is_real_nvcc(real):  # a wrapper script: look for the path it execs
            try:
                with open(real, errors="ignore") as f:
                    for tok in f.read().split():
                        tok = tok.strip("'\"")
                        if tok.endswith("/nvcc") and _is_real_nvcc(tok):
                            candidates.append(os.path.dirname(os.path.dirname(tok)))
            except OSError:
                pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and _toolkit_ok(c):
            return os.path.realpath(c)
    return None


def want_cuda():
    if os.environ.get("MIDUS_FORCE_CPU", "") not in ("", "0"):
        return False, "MIDUS_FORCE_CPU is set"
    if torch.version.cuda is None:
        return False, f"this torch ({torch.__version__}) is a CPU-only build"
    home = find_cuda_home()
    if home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME to the folder whose bin/ holds nvcc)"
    os.environ["CUDA_HOME"] = home  # before torch.utils.cpp_extension reads it
    return True, home


USE_CUDA, CUDA_WHY = want_cuda()

from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)

if USE_CUDA:
    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    _log(f"building the CUDA extension with the toolkit in {CUDA_WHY} "
         f"(torch {torch.__version__}, CUDA {torch.version.cuda}, "
         f"arch list {os.environ.get('TORCH_CUDA_ARCH_LIST', 'of the visible GPUs')})")
else:
    _log(f"building the C++ CPU extension only: {CUDA_WHY}. The ops run on CPU with C++ kernels; "
         f"on CUDA tensors they fall back to the PyTorch reference.")

os.environ.setdefault("MAX_JOBS", str(min(os.cpu_count() or 1, 8)))
if not cpp_extension.is_ninja_available():
    _log("ninja is not installed: the build will be slow and serial (pip install ninja)")

here = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
cxx_flags = ["-O3"]  # torch adds the C++ standard it was built with
define_macros = []
if USE_CUDA:
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    define_macros.append(("MIDUS_WITH_CUDA", None))
    # Slim toolkits lack the cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h pulls in; the
    # pip wheels that came with torch carry them (nvidia/cu13/include). Our kernels include only
    # c10/cuda headers, so this is a fallback for the day one of them needs more.
    extra_inc = []
    if not os.path.exists(os.path.join(os.environ["CUDA_HOME"], "include", "cublas_v2.h")):
        import importlib.util
        spec = importlib.util.find_spec("nvidia")
        for base in (spec.submodule_search_locations or []) if spec else []:
            inc = os.path.join(base, "cu13", "include")
            if os.path.exists(os.path.join(inc, "cublas_v2.h")):
                extra_inc = ["-isystem", inc]  # searched after the toolkit's own -I folder
                break
    ext = cpp_extension.CUDAExtension(
        "midus_ops._C", sources, define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags + extra_inc,
                            "nvcc": ["-O3", "-lineinfo"] + extra_inc},
    )
else:
    ext = cpp_extension.CppExtension("midus_ops._C", sources, define_macros=define_macros,
                                     extra_compile_args={"cxx": cxx_flags})

setup(
    name="midus",
    version="0.1.0",
    description="Fast product-key memory layers (HML/HIVE) and memory-infused depth up-scaling (MIDUS)",
    long_description=open(os.path.join(here, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["midus_ops", "midus_ops.*", "midus", "midus.*"]),
    package_data={"midus.tasks": ["*.yaml"]},  # lm-eval task configs of midus.zeroshot
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56",
        "safetensors",
        "accelerate",
        "gguf",
        "tqdm",
        "mwparserfromhell",
        "datasets",
        "pot",              # optimal transport of method='opt_deus' (midus.deus)
        "lm-eval>=0.4.5",   # zero-shot tasks (`midus eval --tasks`, `midus compare`)
        "matplotlib",       # figures of `midus analyze`, `midus compare` and benchmarks/plot.py
    ],
    extras_require={"test": ["pytest>=7", "pytest-benchmark", "peft"]},  # peft: LoRA on MIDUS models (tests)
    entry_points={"console_scripts": ["midus=midus.cli:main"]},
    zip_safe=False,
)
