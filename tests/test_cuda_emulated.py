"""The CUDA kernels of csrc/cuda, executed without a GPU (issue 13).

tests/cuda_emu/cuda_emu.h emulates the CUDA execution model on the CPU (a fiber per thread, warp
collectives, mma.sync, shared memory, guard pages); the C++ drivers tests/cuda_emu/drv_*.cpp run
every kernel of pk_topk and hive_gather, through the same launch logic as the extension
(csrc/cuda/kernels/*.cuh), against double-precision references. This module compiles them (once
per content hash, cached under the temp folder), runs each driver under the three schedules
(threads and blocks in forward, reverse and random order) and turns every driver case into a
pytest case, so the counts appear in pytest's totals. It also checks that the harness catches
planted bugs (mutation tests), that an out-of-bounds read faults, and that the emulated bf16/fp16
conversions round as torch's do.

Skipped with the reason when no C++20 compiler is found. What this does not cover (timing,
registers, the memory model between blocks, what compute-sanitizer would see, real tensor-core
rounding) is in the README, "How the CUDA kernels are tested without a GPU".
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EMU = ROOT / "tests" / "cuda_emu"
KERNELS = ROOT / "csrc" / "cuda" / "kernels"
# In decreasing build time, so that parallel builds finish together.
DRIVERS = ["drv_hive_bwd", "drv_pk_topk", "drv_hive_fwd", "drv_emu_selftest", "drv_mutants"]
SCHEDULES = ["forward", "reverse", "random"]
FLAGS = ["-std=c++20", "-O1", "-fno-strict-aliasing", "-DMIDUS_CUDA_EMU", "-Wall", "-Wno-unknown-pragmas",
         "-Wno-unused-function"]
RUN_TIMEOUT_S = 600  # a kernel spinning on memory (not modelled) would never yield


def _case_names(driver: str) -> list[str]:
    """The cases a driver defines (EMU_CASE("name")), read from its source at collection time."""
    names = re.findall(r'EMU_CASE\("([^"]+)"\)', (EMU / f"{driver}.cpp").read_text())
    return [n for n in names if not n.startswith("crash_")]


def _find_compiler() -> tuple[str | None, str]:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx or not shutil.which(cxx):
        return None, "no C++ compiler found (set CXX, or install g++ >= 11)"
    probe = "#include <source_location>\nint main() { return std::source_location::current().line() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "probe.cpp"
        src.write_text(probe)
        r = subprocess.run([cxx, "-std=c++20", str(src), "-o", str(Path(d) / "probe")], capture_output=True, text=True)
    if r.returncode != 0:
        return None, f"{cxx} cannot compile C++20 with <source_location>: {r.stderr.strip()[:300]}"
    return cxx, ""


CXX, NO_CXX_REASON = _find_compiler()
needs_cxx = pytest.mark.skipif(CXX is None, reason=f"the emulated CUDA tests need a C++ compiler: {NO_CXX_REASON}")


def _sources_hash(src_dirs: list[Path], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for d in src_dirs:
        for p in sorted(d.glob("*")):
            if p.suffix in (".h", ".cuh", ".cpp"):
                h.update(p.name.encode())
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _compiler_id() -> str:
    r = subprocess.run([CXX, "--version"], capture_output=True, text=True)
    return CXX + " " + r.stdout.split("\n")[0]


def _build_dir() -> Path:
    base = Path(os.environ.get("MIDUS_EMU_BUILD_DIR") or Path(tempfile.gettempdir()) / "midus_cuda_emu")
    d = base / _sources_hash([EMU, KERNELS], _compiler_id() + " ".join(FLAGS))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _compile(src: Path, out: Path, include: Path, flags=FLAGS) -> tuple[float, str]:
    """Compiles src into out (atomically, so a concurrent or interrupted build leaves no half
    binary); returns (seconds, compiler errors or '')."""
    if out.exists():
        return 0.0, ""
    t0 = time.perf_counter()
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    r = subprocess.run([CXX, *flags, f"-I{include}", str(src), "-o", str(tmp)], capture_output=True, text=True)
    if r.returncode != 0:
        return time.perf_counter() - t0, r.stderr[-6000:]
    os.replace(tmp, out)
    return time.perf_counter() - t0, ""


def _parse(stdout: str) -> dict[str, tuple[str, str]]:
    """{case: (PASS|FAIL, hash or message)} from a driver's output."""
    res = {}
    for line in stdout.splitlines():
        m = re.match(r"CASE (\S+) (PASS|FAIL) \d+ ?(.*)$", line)
        if m:
            res[m.group(1)] = (m.group(2), m.group(3))
    return res


class EmuRun:
    def __init__(self):
        self.build_s = 0.0
        self.run_s = 0.0
        self.errors: dict[str, str] = {}           # driver -> compiler error
        self.results: dict[tuple[str, str], dict] = {}  # (driver, schedule) -> parsed output
        self.crashes: dict[tuple[str, str], str] = {}   # (driver, schedule) -> how it ended


@pytest.fixture(scope="session")
def emu(request):
    """Builds the drivers (in parallel, cached by content hash) and runs each under the three
    schedules; the summary line goes to the terminal at the end of the session."""
    run = EmuRun()
    out = _build_dir()
    jobs = max(1, os.cpu_count() or 1)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(jobs) as ex:
        futs = {d: ex.submit(_compile, EMU / f"{d}.cpp", out / d, EMU) for d in DRIVERS}
        for d, f in futs.items():
            _, err = f.result()
            if err:
                run.errors[d] = err
    run.build_s = time.perf_counter() - t0
    t0 = time.perf_counter()

    def go(driver, sched):
        try:
            r = subprocess.run([str(out / driver), "--schedule", sched, "--seed", "13"], capture_output=True,
                               text=True, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:  # the cases it finished still count
            so = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            r = subprocess.CompletedProcess(e.cmd, -9, so,
                                            f"killed after {RUN_TIMEOUT_S} s (a kernel that never yields?)")
        return driver, sched, r

    with concurrent.futures.ThreadPoolExecutor(jobs) as ex:
        futs = [ex.submit(go, d, s) for d in DRIVERS if d not in run.errors for s in SCHEDULES]
        for f in futs:
            d, s, r = f.result()
            run.results[(d, s)] = _parse(r.stdout)
            if r.returncode not in (0, 1):
                run.crashes[(d, s)] = f"exit status {r.returncode}: {r.stderr.strip()[-2000:]}"
    run.run_s = time.perf_counter() - t0
    yield run
    cases = sum(len(v) for v in run.results.values())
    passed = sum(1 for v in run.results.values() for st, _ in v.values() if st == "PASS")
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is not None and capman is not None:
        with capman.global_and_fixture_disabled():  # teardown output is captured otherwise
            tr.write_line(f"\n[cuda_emu] {len(DRIVERS)} drivers, {cases} emulated kernel cases (all schedules): "
                          f"{passed} passed; build {run.build_s:.0f} s (0 when cached), run {run.run_s:.0f} s")


PARAMS = [pytest.param(d, c, s, id=f"{c}-{s}") for d in DRIVERS for c in _case_names(d) for s in SCHEDULES]


@needs_cxx
@pytest.mark.parametrize("driver,case,schedule", PARAMS)
def test_emulated(emu, driver, case, schedule):
    assert driver not in emu.errors, f"{driver}.cpp does not compile:\n{emu.errors[driver]}"
    res = emu.results[(driver, schedule)]
    if case not in res:
        crash = emu.crashes.get((driver, schedule), "its output has no line for this case")
        pytest.fail(f"{driver} ({schedule} schedule) did not report {case}: {crash}")
    status, detail = res[case]
    assert status == "PASS", f"{case} ({schedule} schedule): {detail}"
    # Every kernel is deterministic: what a case's kernels wrote cannot depend on the order in which
    # threads and blocks ran.
    fwd = emu.results.get((driver, "forward"), {}).get(case)
    if schedule != "forward" and fwd is not None and fwd[0] == "PASS":
        assert detail == fwd[1], f"{case}: results differ between the forward and {schedule} schedules"


@needs_cxx
def test_out_of_bounds_read_faults(emu):
    """A device buffer ends at a guard page: one element past it faults, naming the buffer."""
    exe = _build_dir() / "drv_emu_selftest"
    assert "drv_emu_selftest" not in emu.errors
    r = subprocess.run([str(exe), "--filter", "crash_oob_read"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 86, (r.returncode, r.stdout, r.stderr)
    assert "past the end of device buffer 'in_37'" in r.stderr and "kernel oob_read" in r.stderr, r.stderr


@needs_cxx
def test_16bit_conversions_round_like_torch(tmp_path):
    """__float2bfloat16_rn / __float2half_rn of the emulator against torch (round to nearest even,
    subnormals, overflow, the fp16 midpoint 65520, halfway cases), and both back to fp32 for every
    16-bit pattern; NaN becomes the hardware's canonical 0x7fff."""
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    exe = tmp_path / "conv_check"
    _, err = _compile(EMU / "conv_check.cpp", exe, EMU, ["-std=c++20", "-O1"])
    assert not err, err
    rng = np.random.default_rng(0)
    special = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x477FE000, 0x477FF000,
               0x477FEFFF, 0x477FF001, 0x33000000, 0x33000001, 0x387FC000, 0x38800000, 0x7F7FFFFF, 1, 0x00800000]
    bits = np.concatenate([
        rng.integers(0, 2 ** 32, 100000, dtype=np.uint64).astype(np.uint32),
        np.array(special, dtype=np.uint32),
        (rng.integers(0, 2 ** 16, 10000).astype(np.uint32) << 16) | 0x8000,  # bf16 halfway
        (rng.integers(0x38800000 >> 13, 0x477FE000 >> 13, 10000).astype(np.uint32) << 13) | 0x1000,  # fp16 halfway
        rng.integers(0x33000000, 0x38800000, 10000).astype(np.uint32),  # fp16 subnormal range
    ])
    r = subprocess.run([str(exe)], input="".join(f"{b:08x}\n" for b in bits), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    got = np.array([[int(x, 16) for x in ln.split()] for ln in lines[:len(bits)]], dtype=np.uint32)
    f = torch.from_numpy(bits.view(np.float32).copy())
    nan = np.isnan(bits.view(np.float32))
    for col, dt in ((0, torch.bfloat16), (1, torch.float16)):
        want = f.to(dt).view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
        bad = np.nonzero((got[:, col] != want) & ~nan)[0]
        assert bad.size == 0, f"{dt}: {bad.size} conversions differ, e.g. {bits[bad[0]]:08x} -> {got[bad[0], col]:04x}" \
                              f" (torch {want[bad[0]]:04x})"
        assert set(got[nan, col].tolist()) == {0x7FFF}, "NaN must convert to the canonical 0x7fff"
    back = np.array([[int(x, 16) for x in ln.split()] for ln in lines[len(bits):len(bits) + 65536]], dtype=np.uint32)
    p = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    for col, dt in ((0, torch.bfloat16), (1, torch.float16)):
        want = p.view(dt).float().view(torch.int32).numpy().view(np.uint32)
        wnan = np.isnan(want.view(np.float32))
        assert np.array_equal(np.isnan(back[:, col].view(np.float32)), wnan)
        assert np.array_equal(back[~wnan, col], want[~wnan]), f"{dt} -> fp32 differs"


# ------------------------------------------------------------------------------------------------
# Mutation tests: plant a bug in a copy of the kernels, build a driver against it, and require the
# harness to report a failure (a wrong value, a divergence, a deadlock) in the named cases.
# ------------------------------------------------------------------------------------------------
MUTATIONS = {
    # fwd_tc: the barrier between writing the u tiles and the tensor cores reading them.
    "removed_syncthreads": (
        "hive_fwd.cuh",
        "    __syncthreads();\n    for (int kk = 0; kk < kz; kk += 16) {",
        "    for (int kk = 0; kk < kz; kk += 16) {",
        "drv_mutants", "mut_fwd_tc64_bf16"),
    # the A fragment's second and third registers exchanged (rows g+8 and columns 2c+8 swap)
    "swapped_mma_fragment_registers": (
        "common.cuh",
        "  a[1] = lds32(X + (m0 + g + 8) * ld + k0 + 2 * c);\n  a[2] = lds32(X + (m0 + g) * ld + k0 + 8 + 2 * c);",
        "  a[2] = lds32(X + (m0 + g + 8) * ld + k0 + 2 * c);\n  a[1] = lds32(X + (m0 + g) * ld + k0 + 8 + 2 * c);",
        "drv_mutants", "mut_bwd_tc32_bf16"),
    # bag_dot: the butterfly reduction moved under the lane-0 branch (only lane 0 shuffles)
    "divergent_warp_reduction": (
        "hive_bag.cuh",
        "      const acc_t s = warp_sum(part[q]);\n      if (lane == 0 && j0 + q < k) gw[b * k + j0 + q] = cvt<scalar_t>(s);",
        "      if (lane == 0 && j0 + q < k) gw[b * k + j0 + q] = cvt<scalar_t>(warp_sum(part[q]));",
        "drv_mutants", "mut_bag_dot_f32"),
}


@pytest.fixture(scope="module")
def mutants(tmp_path_factory):
    """Each mutation applied to its own copy of the kernels and its driver built against it (-O0:
    the build is what costs here), all in parallel: {name: (executable or None, compiler error)}."""
    def build(name):
        header, old, new, driver, _ = MUTATIONS[name]
        src = (KERNELS / header).read_text()
        if src.count(old) != 1:
            return None, f"the code this mutation edits is no longer in {header}: update the test"
        d = tmp_path_factory.mktemp(name)
        shutil.copytree(KERNELS, d / "csrc" / "cuda" / "kernels")
        shutil.copytree(EMU, d / "tests" / "cuda_emu")
        (d / "csrc" / "cuda" / "kernels" / header).write_text(src.replace(old, new))
        flags = [f for f in FLAGS if f != "-O1"] + ["-O0"]
        _, err = _compile(d / "tests" / "cuda_emu" / f"{driver}.cpp", d / driver, d / "tests" / "cuda_emu", flags)
        return (None if err else d / driver), err

    with concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as ex:
        return dict(zip(MUTATIONS, ex.map(build, MUTATIONS)))


@needs_cxx
@pytest.mark.parametrize("name", list(MUTATIONS))
def test_harness_catches_planted_bug(name, mutants):
    exe, err = mutants[name]
    assert exe is not None, err
    case = MUTATIONS[name][4]
    for sched in SCHEDULES:
        r = subprocess.run([str(exe), "--schedule", sched, "--filter", case], capture_output=True, text=True,
                           timeout=RUN_TIMEOUT_S)
        res = _parse(r.stdout)
        assert case in res, (r.stdout, r.stderr)
        assert res[case][0] == "FAIL", f"{name}: the harness did not notice ({sched} schedule)"
