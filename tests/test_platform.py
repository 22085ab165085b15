"""Platform honesty: every Linux-specific reader degrades where its file or feature is missing.

The platform is faked (``sys.platform``), /proc is pointed at folders built in tmp_path (or at
nothing), and cgroup v1 and v2 layouts are built in tmp_path: the real /proc and /sys are never
written. The CLI checks run the real `flashmoe` command group through click's CliRunner.
"""
from __future__ import annotations

import os
import resource
import stat
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flashmoe import cgroup, machine, metrics
from flashmoe.errors import FlashMoEError

GiB = 1 << 30
MiB = 1 << 20
V1_UNLIMITED = "9223372036854771712\n"  # what cgroup v1 says for "no limit"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _fake_proc(tmp_path: Path, **files: str) -> Path:
    """A /proc in tmp_path with the given files: meminfo="...", self_cgroup="...", self_io=..."""
    proc = tmp_path / "proc"
    proc.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        _write(proc / name.replace("self_", "self/").replace("sys_vm_", "sys/vm/"), text)
    return proc


@pytest.fixture
def darwin(monkeypatch, tmp_path):
    """A macOS-like process: sys.platform is "darwin" and there is no /proc."""
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(machine, "PROC", tmp_path / "no-proc")
    return tmp_path / "no-proc"


def _as_unprivileged(monkeypatch):
    """These tests may run as root, which writes anywhere; make access() answer from the mode bits,
    as it does for the unprivileged user of a non-delegated cgroup."""
    real = os.access

    def access(path, mode, *a, **kw):
        if mode & os.W_OK and not (os.stat(path).st_mode & stat.S_IWUSR):
            return False
        return real(path, mode, *a, **kw)

    monkeypatch.setattr(os, "access", access)


# ------------------------------------------------------------------------------------------- memory


def test_physical_and_available_ram_from_meminfo(tmp_path):
    proc = _fake_proc(tmp_path, meminfo="MemTotal:       16384 kB\nMemFree:  100 kB\nMemAvailable:    8192 kB\n")
    assert machine.physical_ram(proc) == 16 * MiB
    assert machine.mem_available(proc) == 8 * MiB


def test_ram_without_proc_falls_back_to_sysconf(darwin):
    # macOS: no /proc/meminfo; `sysctl -n hw.memsize` fails on this (Linux) machine, so sysconf answers
    expected = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert machine.physical_ram() == expected > 0
    assert machine.mem_available() is None  # no such figure on macOS: None, not a guess


def test_garbled_meminfo_is_not_a_number(tmp_path):
    proc = _fake_proc(tmp_path, meminfo="MemTotal: lots\nMemAvailable:\n")
    assert machine.read_meminfo("MemTotal", proc) is None
    assert machine.mem_available(proc) is None
    assert machine.physical_ram(proc) == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ------------------------------------------------------------------------------------------- cgroups


def _v2_layout(tmp_path: Path, own: str = "/user.slice/app.scope") -> tuple:
    root = tmp_path / "cgroup"
    _write(root / "cgroup.controllers", "cpuset cpu io memory pids\n")
    _write(root / "user.slice" / "memory.max", f"{2 * GiB}\n")
    _write(root / "user.slice" / "app.scope" / "memory.max", "max\n")
    _write(root / "user.slice" / "app.scope" / "cgroup.controllers", "memory pids\n")
    proc = _fake_proc(tmp_path, self_cgroup=f"0::{own}\n")
    return root, proc


def _v1_layout(tmp_path: Path) -> tuple:
    root = tmp_path / "cgroup"
    _write(root / "memory" / "memory.limit_in_bytes", V1_UNLIMITED)
    _write(root / "memory" / "docker" / "memory.limit_in_bytes", V1_UNLIMITED)
    _write(root / "memory" / "docker" / "abc" / "memory.limit_in_bytes", f"{GiB}\n")
    proc = _fake_proc(tmp_path, self_cgroup="12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/x\n")
    return root, proc


def test_cgroup_v2_limit_is_the_tightest_ancestor(tmp_path):
    root, proc = _v2_layout(tmp_path)
    assert machine.cgroup_memory_limit(proc, root) == 2 * GiB
    _write(root / "user.slice" / "app.scope" / "memory.max", f"{512 * MiB}\n")
    assert machine.cgroup_memory_limit(proc, root) == 512 * MiB
    assert machine.own_cgroup(None, proc) == "/user.slice/app.scope"
    assert machine.own_cgroup("memory", proc) is None


def test_cgroup_v1_limit_ignores_the_unlimited_value(tmp_path):
    root, proc = _v1_layout(tmp_path)
    assert machine.cgroup_memory_limit(proc, root) == GiB
    assert machine.own_cgroup("memory", proc) == "/docker/abc"
    assert machine.own_cgroup(None, proc) is None
    _write(root / "memory" / "docker" / "abc" / "memory.limit_in_bytes", V1_UNLIMITED)
    assert machine.cgroup_memory_limit(proc, root) is None


def test_no_cgroup_at_all(tmp_path):
    proc = _fake_proc(tmp_path)  # a /proc without self/cgroup
    assert machine.cgroup_lines(proc) is None
    assert machine.cgroup_memory_limit(proc, tmp_path / "cgroup") is None
    with pytest.raises(FlashMoEError) as e:
        cgroup.detect(root=tmp_path / "cgroup", proc=proc, systemd=False)
    msg = str(e.value)
    assert "\n" not in msg and f"no {proc / 'self' / 'cgroup'} here" in msg


def test_detect_v2_and_v1_layouts(tmp_path):
    root, proc = _v2_layout(tmp_path / "a")
    b = cgroup.detect(root=root, proc=proc, systemd=False)
    assert b.kind == "v2" and b.parent == root / "user.slice" / "app.scope"
    root, proc = _v1_layout(tmp_path / "b")
    b = cgroup.detect(root=root, proc=proc, systemd=False)
    assert b.kind == "v1" and b.parent == root / "memory" / "docker" / "abc"


def test_detect_v2_without_the_memory_controller(tmp_path):
    root, proc = _v2_layout(tmp_path)
    _write(root / "user.slice" / "app.scope" / "cgroup.controllers", "pids\n")
    with pytest.raises(FlashMoEError, match="enable a delegated cgroup v2 subtree"):
        cgroup.detect(root=root, proc=proc, systemd=False)


def test_unwritable_cgroup_is_not_used(tmp_path, monkeypatch):
    root, proc = _v2_layout(tmp_path)
    parent = root / "user.slice" / "app.scope"
    _as_unprivileged(monkeypatch)
    parent.chmod(0o555)
    try:
        with pytest.raises(FlashMoEError) as e:
            cgroup.detect(root=root, proc=proc, systemd=False)
        assert str(e.value).startswith("cannot create a memory cgroup: enable a delegated cgroup v2 subtree")
    finally:
        parent.chmod(0o755)
    assert cgroup.detect(root=root, proc=proc, systemd=False).kind == "v2"


def test_limited_in_a_fake_v2_cgroup_writes_the_limit_and_reads_events(tmp_path):
    root, proc = _v2_layout(tmp_path)
    backend = cgroup.detect(root=root, proc=proc, systemd=False)
    lim = cgroup.Limited(64 * MiB, backend)
    assert lim.path.parent == backend.parent and lim.path.name.startswith("flashmoe-")
    assert (lim.path / "memory.max").read_text() == str(64 * MiB)
    assert not (lim.path / "memory.swap.max").exists()  # only written where the kernel has it
    assert lim.peak_bytes() is None and lim.oom_killed() is False
    (lim.path / "memory.peak").write_text("123456\n")
    (lim.path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert lim.peak_bytes() == 123456 and lim.oom_killed() is True
    (lim.path / "memory.events").write_text("garbage\noom_kill many\n")
    assert lim.oom_killed() is False
    for f in lim.path.iterdir():  # a real cgroup folder is removed with its files; this one is not
        f.unlink()
    lim.close()
    assert not lim.path.exists()


def test_a_cgroup_that_cannot_be_created_is_a_clear_error(tmp_path):
    gone = tmp_path / "removed-meanwhile"
    with pytest.raises(FlashMoEError) as e:
        cgroup.Limited(64 * MiB, cgroup.Backend("v2", gone))
    assert str(e.value) == f"cannot create a memory cgroup in {gone}: No such file or directory"
    with pytest.raises(FlashMoEError, match=r"^cannot create a memory cgroup in /proc/self: "):
        cgroup.Limited(64 * MiB, cgroup.Backend("v1", Path("/proc/self")))  # a real kernel refusal


def test_detect_on_macos(darwin):
    with pytest.raises(FlashMoEError) as e:
        cgroup.detect(systemd=False)
    assert str(e.value) == ("memory cgroups exist only on Linux, and this is macOS: runs cannot be confined "
                            "to a memory budget here")


# ------------------------------------------------------------------------------------- drop_caches


def test_drop_caches(tmp_path, monkeypatch):
    proc = _fake_proc(tmp_path, sys_vm_drop_caches="0\n")
    assert cgroup.drop_caches(proc) is None
    assert (proc / "sys" / "vm" / "drop_caches").read_text() == "3\n"
    nothing = _fake_proc(tmp_path / "other")
    assert cgroup.drop_caches(nothing) == f"cannot drop the page cache: there is no {nothing}/sys/vm/drop_caches here"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert cgroup.drop_caches(proc) == ("dropping the page cache needs Linux (/proc/sys/vm/drop_caches), and this "
                                        "is macOS")
    assert (proc / "sys" / "vm" / "drop_caches").read_text() == "3\n"  # not touched on macOS


# ------------------------------------------------------------------------------------ CAP_IPC_LOCK


def test_cap_ipc_lock_and_memlock(tmp_path, darwin, monkeypatch):
    assert machine.has_cap_ipc_lock() is False  # no /proc/self/status: no capability claimed
    with_cap = _fake_proc(tmp_path / "a", self_status="Name:\tpython\nCapEff:\t0000000000004000\n")
    without = _fake_proc(tmp_path / "b", self_status="CapEff:\t00000000a80425fb\n")
    garbled = _fake_proc(tmp_path / "c", self_status="CapEff:\tzz\n")
    assert machine.has_cap_ipc_lock(with_cap) is True
    assert machine.has_cap_ipc_lock(without) is False
    assert machine.has_cap_ipc_lock(garbled) is False
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    assert machine.memlock_limit() == (None if soft == resource.RLIM_INFINITY else soft)
    assert machine.memlock_hint() == "ulimit -l unlimited"  # no /etc/security/limits.conf on macOS
    monkeypatch.setattr(sys, "platform", "linux")
    assert "limits.conf" in machine.memlock_hint()


def test_policy_reexports_and_machine_info_on_macos(darwin):
    from flashmoe import policy

    assert policy.physical_ram is machine.physical_ram
    assert policy.cgroup_memory_limit is machine.cgroup_memory_limit
    assert policy._has_cap_ipc_lock is machine.has_cap_ipc_lock
    m = policy.MachineInfo.detect()
    phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert (m.physical_ram, m.ram_bytes, m.cgroup_limit, m.can_lock_unlimited) == (phys, phys, None, False)
    assert m.describe_ram() == policy.format_size(phys)


# --------------------------------------------------------------------------------------- counters


def test_process_counters_from_proc_self_io(tmp_path):
    proc = _fake_proc(tmp_path, self_io="rchar: 99\nread_bytes: 12345\nwrite_bytes: 0\n")
    c = metrics.ProcessCounters.now(proc)
    assert (c.read_bytes, c.exact_bytes) == (12345, True)


def test_process_counters_without_proc_are_estimates(darwin):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_inblock
    c = metrics.ProcessCounters.now()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_inblock
    assert c.exact_bytes is False  # reports can say the bytes are estimated
    assert before * 4096 <= c.read_bytes <= after * 4096
    d = c.minus(metrics.ProcessCounters(0, 0, 0, True))
    assert d.exact_bytes is False


@pytest.mark.parametrize("plat,scale", [("darwin", 1), ("linux", 1024)])
def test_peak_rss_units(monkeypatch, plat, scale):
    # ru_maxrss is bytes on macOS, KiB on Linux
    assert machine.maxrss_bytes(1000, plat) == 1000 * scale
    monkeypatch.setattr(sys, "platform", plat)
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    got = metrics.peak_rss_bytes()
    r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert r0 * scale <= got <= r1 * scale


def test_current_rss_without_proc_is_the_peak(darwin):
    real = metrics.current_rss_bytes(Path("/proc"))  # the real one on this (Linux) machine
    assert 0 < real
    got = metrics.current_rss_bytes()
    assert got == metrics.peak_rss_bytes() >= 1


# ------------------------------------------------------------------------------------- direct I/O


def test_direct_io_support_is_probed_on_a_real_file(tmp_path):
    f = tmp_path / "data"
    f.write_bytes(b"x" * 65536)
    ok, how = machine.direct_io_support(f)
    if ok:
        assert how == "O_DIRECT"
    else:
        assert how.startswith(("O_DIRECT is refused by the file system", "direct I/O not supported here"))


def test_no_direct_io_on_a_system_without_it(tmp_path, monkeypatch):
    f = tmp_path / "data"
    f.write_bytes(b"x" * 8192)
    monkeypatch.setattr(sys, "platform", "sunos5")
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    assert machine.direct_io_support(f) == (False, "direct I/O not supported here (no direct I/O (O_DIRECT or "
                                                   "F_NOCACHE) on sunos5)")
    with pytest.raises(OSError):
        machine.open_uncached(f)


def test_pread_into_without_preadv(tmp_path, monkeypatch):
    import mmap

    f = tmp_path / "data"
    f.write_bytes(bytes(range(256)) * 32)
    buf = mmap.mmap(-1, 4096)
    fd = os.open(f, os.O_RDONLY)
    try:
        monkeypatch.delattr(os, "preadv")  # macOS before 11
        assert machine.pread_into(fd, buf, 256) == 4096
        assert buf[:4] == bytes([0, 1, 2, 3]) and buf[255] == 255
    finally:
        os.close(fd)
        buf.close()


def test_measure_disk_says_when_nothing_bypasses_the_page_cache(tiny_model, monkeypatch):
    from flashmoe import bench

    # a system with neither O_DIRECT/F_NOCACHE nor posix_fadvise: the method says what was measured
    monkeypatch.setattr(sys, "platform", "sunos5")
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    d = bench.measure_disk(tiny_model, depths=(1,), reads=16)
    assert d["ok"] is True and d["direct"] is False
    assert d["method"] == ("buffered (direct I/O not available: no direct I/O (O_DIRECT or F_NOCACHE) on sunos5; "
                           "the file could not be evicted from the page cache either: posix_fadvise is not "
                           "available here, so reads may be served from memory)")
    assert d["depths"][0]["bytes"] > 0


def test_tune_disk_model_counts_f_nocache_as_direct():
    from flashmoe.tune import DiskModel

    depths = [{"qd": 1, "bytes_per_s": 1e9}, {"qd": 4, "bytes_per_s": 3e9}]
    mac = DiskModel({"ok": True, "method": "F_NOCACHE", "direct": True, "depths": depths}, None)
    assert mac.has(True) and not mac.has(False)
    fallback = DiskModel({"ok": True, "method": "buffered (direct I/O not available: x)", "direct": False,
                          "depths": depths}, None)
    assert fallback.has(False) and not fallback.has(True)
    old = DiskModel({"ok": True, "method": "O_DIRECT", "depths": depths}, None)  # a document without "direct"
    assert old.has(True)


def test_machine_facts_without_affinity_or_proc(tmp_path, monkeypatch, darwin):
    from flashmoe import bench

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    facts = bench.machine_facts(str(f))
    assert facts["cores_usable"] == facts["cores"] == os.cpu_count()
    assert facts["ram_bytes"] == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# -------------------------------------------------------------------------------------------- CLI


def _cli(args):
    from flashmoe.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, start: str) -> str:
    assert result.exit_code != 0
    out = result.output
    assert "Traceback" not in out
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no uncaught exception
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith(start), lines[0]
    return lines[0]


@pytest.fixture
def junk_model(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"not a model")
    return p


def test_bench_ram_limit_on_macos_needs_linux(darwin, junk_model):
    line = _one_line_error(_cli(["bench", "-m", junk_model, "--vs", "stock-mmap", "--ram-limit", "2GiB"]),
                           "error: --ram-limit needs Linux (each run is confined with a Linux memory cgroup), "
                           "and this is macOS; ")
    assert "run without --ram-limit" in line


def test_bench_sweep_ram_on_macos_needs_linux(darwin, junk_model):
    _one_line_error(_cli(["bench", "-m", junk_model, "--sweep-ram", "1GiB,2GiB"]),
                    "error: --sweep-ram needs Linux (")


def test_bench_drop_caches_on_macos_needs_linux(darwin, junk_model):
    line = _one_line_error(_cli(["bench", "-m", junk_model, "--drop-caches", "-n", "2"]),
                           "error: --drop-caches needs Linux (it writes /proc/sys/vm/drop_caches), and this is macOS")
    assert line.endswith("run without --drop-caches, or in a Linux VM")


def test_bench_on_linux_reaches_the_model_check(junk_model, monkeypatch):
    # the platform check lets Linux through: the next error is about the (junk) model, still one line
    monkeypatch.setattr(sys, "platform", "linux")
    result = _cli(["bench", "-m", junk_model, "--vs", "stock-mmap", "--no-disk", "--no-reference"])
    line = _one_line_error(result, "error: ")
    assert "needs Linux" not in line
