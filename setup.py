"""Build midus_ops._C against the torch that is already installed.

    pip install torch ninja
    pip install --no-build-isolation .

What is built (environment variables; docs/environment.md lists them all):

  MIDUS_BUILD=auto|cuda|cpu  auto (the default): a CUDAExtension (the C++ CPU kernels and the CUDA
                       kernels in csrc/cuda) when torch is a CUDA build and a CUDA toolkit is found,
                       else the C++ CPU extension alone, saying why. cuda: the CUDA extension or an
                       error naming what is missing (never a silent CPU build). cpu: the C++ CPU
                       extension even where CUDA is possible.
  MIDUS_FORCE_CPU=1    the older spelling of MIDUS_BUILD=cpu (an error together with MIDUS_BUILD=cuda).
  CUDA_HOME, CUDA_PATH the toolkit; otherwise found from `nvcc` on PATH (also behind a wrapper
                       script, whose target is read) or /usr/local/cuda*.
  TORCH_CUDA_ARCH_LIST default DEFAULT_CUDA_ARCH_LIST when no GPU is visible, else the visible GPUs'.
  MAX_JOBS             parallel compile jobs; default default_max_jobs(): one per CPU core, fewer when
                       the available memory holds fewer jobs of MEM_PER_JOB_GIB each.

The decision (CUDA or CPU, why, the arch list, MAX_JOBS) is printed to stderr, which pip shows only
with `pip -v` (or when the build fails), and also to /dev/tty when compiling on a terminal, which pip
cannot capture, so a quiet `pip install` still says what it builds. It is also compiled into the
extension (csrc/build_info.cpp, from a header this script generates under build/): after the build,
`midus_ops.BUILD_INFO` says what the loaded extension was built with.

The CUDA code compiles as several translation units (csrc/cuda/*.cu: one per kernel family, and the
ATen glue and registration as plain C++ in csrc/cuda/*.cpp; see csrc/cuda/launch.h), so that ninja
runs them in parallel and nvcc never parses ATen/ATen.h or torch/library.h.
"""
import glob
import json
import os
import re
import shutil
import subprocess
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

# Peak resident memory of one compile job (/usr/bin/time -v, CUDA 13.0, torch 2.14): 1.55 GB for
# nvcc on the CUDA code when it still included ATen/ATen.h (its largest process, cicc), about
# 1.0 GB for g++ on the ATen headers; 2 GiB per job leaves a margin for other toolkits and torch
# versions.
MEM_PER_JOB_GIB = 2.0

BUILD_CHOICES = ("auto", "cuda", "cpu")


class BuildConfigError(Exception):
    """A build that cannot be what the environment asks for; the message names the variable."""


def _log(msg: str) -> None:
    print(f"[midus setup] {msg}", file=sys.stderr, flush=True)


# The setup.py commands that compile (pip runs bdist_wheel or editable_wheel; the metadata step
# before it, dist_info, compiles nothing and stays off the terminal, so a line shows once).
BUILD_COMMANDS = ("build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop")


def _announce(msg: str) -> None:
    """To stderr, and to the terminal too when this run compiles and stderr is not the terminal:
    pip captures the build's output (shown with -v or on failure) but cannot capture /dev/tty.
    Without a terminal (CI), stderr only."""
    _log(msg)
    if any(a in BUILD_COMMANDS for a in sys.argv[1:]):
        _to_tty(msg)


def _to_tty(msg: str) -> None:
    try:
        if os.isatty(sys.stderr.fileno()):
            return
    except (AttributeError, OSError, ValueError):
        pass
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(f"[midus setup] {msg}\n")
    except OSError:
        pass


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


def requested_build(env) -> str:
    """MIDUS_BUILD (auto, cuda or cpu), with MIDUS_FORCE_CPU=1 read as cpu."""
    raw = env.get("MIDUS_BUILD", "")
    value = raw.strip().lower() or "auto"
    if value not in BUILD_CHOICES:
        raise BuildConfigError(f"MIDUS_BUILD={raw!r} is not one of {', '.join(BUILD_CHOICES)} "
                               f"(auto: CUDA when possible, else CPU; unset means auto)")
    if env.get("MIDUS_FORCE_CPU", "") not in ("", "0"):
        if value == "cuda":
            raise BuildConfigError("MIDUS_BUILD=cuda and MIDUS_FORCE_CPU (the older spelling of MIDUS_BUILD=cpu) "
                                   "are both set: unset one")
        value = "cpu"
    return value


def decide_build(env, torch_cuda, cuda_home_finder=find_cuda_home):
    """(use_cuda, cuda_home or None, why): the build MIDUS_BUILD asks for with this torch (its
    torch.version.cuda, None for a CPU-only build) and toolkit. Raises BuildConfigError when
    MIDUS_BUILD=cuda cannot be met, or when MIDUS_BUILD has a bad value."""
    want = requested_build(env)
    if want == "cpu":
        why = "MIDUS_BUILD=cpu" if env.get("MIDUS_BUILD", "").strip().lower() == "cpu" else "MIDUS_FORCE_CPU is set"
        return False, None, why
    missing = None
    if torch_cuda is None:
        missing = f"this torch ({torch.__version__}) is a CPU-only build"
        home = None
    else:
        home = cuda_home_finder()
        if home is None:
            missing = "no CUDA toolkit found (set CUDA_HOME to the folder whose bin/ holds nvcc)"
    if missing is None:
        return True, home, ("MIDUS_BUILD=cuda" if want == "cuda"
                            else "MIDUS_BUILD=auto: a CUDA torch and a CUDA toolkit were found")
    if want == "cuda":
        raise BuildConfigError(f"MIDUS_BUILD=cuda, but {missing}. Install a CUDA build of torch and a CUDA "
                               f"toolkit, or build the CPU extension with MIDUS_BUILD=cpu (or auto)")
    return False, None, missing


def available_memory_bytes():
    """MemAvailable, or less where a cgroup limits this process; None when unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                limit = int(f.read().strip())
        except (OSError, ValueError):  # absent, or "max"
            continue
        if 0 < limit < (1 << 60):
            avail = limit if avail is None else min(avail, limit)
    return avail


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_max_jobs(cpus: int, mem_bytes, per_job_gib: float = MEM_PER_JOB_GIB) -> int:
    """One job per core, fewer when the memory would not hold them (at least one)."""
    jobs = max(1, cpus)
    if mem_bytes is not None:
        jobs = min(jobs, int(mem_bytes // int(per_job_gib * (1 << 30))))
    return max(1, jobs)


def cuda_sources(root: str = "."):
    """csrc/cuda's units: the kernel families (.cu) and the ATen glue and registration (.cpp)."""
    names = [os.path.basename(p) for ext in ("*.cu", "*.cpp") for p in glob.glob(os.path.join(root, "csrc", "cuda", ext))]
    return sorted(os.path.join("csrc", "cuda", name) for name in names)


def toolkit_version(cuda_home: str):
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def write_build_info(info: dict, folder: str) -> str:
    """The header csrc/build_info.cpp compiles in; rewritten only when it changes (ninja then
    recompiles that one small file)."""
    os.makedirs(folder, exist_ok=True)
    text = ("// Generated by setup.py (write_build_info): what this build of midus_ops._C was made with.\n"
            f"#define MIDUS_BUILD_INFO_JSON {json.dumps(json.dumps(info, sort_keys=True))}\n")
    path = os.path.join(folder, "midus_build_info.h")
    try:
        with open(path) as f:
            if f.read() == text:
                return folder
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)
    return folder


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        use_cuda, cuda_home, why = decide_build(os.environ, torch.version.cuda)
    except BuildConfigError as e:
        _to_tty(f"error: {e}")
        sys.exit(f"[midus setup] error: {e}")  # to stderr
    if use_cuda:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    from torch.utils import cpp_extension  # (reads CUDA_HOME at import)

    user_jobs = os.environ.get("MAX_JOBS", "").strip()
    if user_jobs:
        jobs_why = "MAX_JOBS set"
    else:
        cpus, mem = cpu_count(), available_memory_bytes()
        os.environ["MAX_JOBS"] = str(default_max_jobs(cpus, mem))
        mem_text = f"{mem / (1 << 30):.0f} GiB available" if mem is not None else "memory unknown"
        jobs_why = f"{cpus} cores, {mem_text}, {MEM_PER_JOB_GIB:g} GiB per job"
    jobs_text = f"MAX_JOBS={os.environ['MAX_JOBS']} ({jobs_why})"

    info = {"with_cuda": use_cuda, "requested": requested_build(os.environ), "why": why,
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "max_jobs": int(os.environ["MAX_JOBS"]),
            "cuda_home": None, "cuda_toolkit": None, "cuda_arch_list": None}
    if use_cuda:
        cpp_extension.CUDA_HOME = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or "of the visible GPUs: " + ";".join(
            sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))
        info.update(cuda_home=cuda_home, cuda_toolkit=toolkit_version(cuda_home), cuda_arch_list=arch)
        _announce(f"building the CUDA extension ({why}): toolkit {cuda_home} (CUDA {info['cuda_toolkit']}), "
                  f"torch {torch.__version__} (CUDA {torch.version.cuda}), arch list {arch}, {jobs_text}")
    else:
        _announce(f"building the C++ CPU extension only ({why}), {jobs_text}. The ops run on CPU with C++ "
                  f"kernels; on CUDA tensors they fall back to the PyTorch reference.")
    if not cpp_extension.is_ninja_available():
        _announce("ninja is not installed: the build will be slow and serial (pip install ninja)")

    generated = os.path.join(here, "build", "midus_generated")
    try:
        generated = write_build_info(info, generated)
    except OSError:  # a read-only source folder
        import tempfile
        generated = write_build_info(info, tempfile.mkdtemp(prefix="midus_build_info_"))

    sources = []
    define_macros = []
    if use_cuda:
        sources += cuda_sources(here)
        define_macros.append(("MIDUS_WITH_CUDA", None))
    sources += sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3"]  # torch adds the C++ standard it was built with
    if use_cuda:
        # Slim toolkits lack the cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h pulls in; the
        # pip wheels that came with torch carry them (nvidia/cu13/include). Our kernels include only
        # c10/cuda headers, so this is a fallback for the day one of them needs more.
        extra_inc = []
        if not os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h")):
            import importlib.util
            spec = importlib.util.find_spec("nvidia")
            for base in (spec.submodule_search_locations or []) if spec else []:
                inc = os.path.join(base, "cu13", "include")
                if os.path.exists(os.path.join(inc, "cublas_v2.h")):
                    extra_inc = ["-isystem", inc]  # searched after the toolkit's own -I folder
                    break
        ext = cpp_extension.CUDAExtension(
            "midus_ops._C", sources, define_macros=define_macros, include_dirs=[generated],
            extra_compile_args={"cxx": cxx_flags + extra_inc,
                                "nvcc": ["-O3", "-lineinfo"] + extra_inc},
        )
    else:
        ext = cpp_extension.CppExtension("midus_ops._C", sources, define_macros=define_macros,
                                         include_dirs=[generated], extra_compile_args={"cxx": cxx_flags})

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


# pip and setuptools run this file as __main__; tests import it for the functions above.
if __name__ == "__main__":
    main()
