"""CPU thread policy: the cores a process may use, the trainer's thread count, the pool's shares."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smallscale import hardware
from smallscale.study import executors
from smallscale.study.executors import default_cpu_workers, worker_env, worker_threads
from smallscale.study.grid import RunSpec
from smallscale.train.trainer import load_run_config, train

REPO = Path(__file__).resolve().parents[1]
V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def fake_root(tmp_path: Path, membership: str, mountinfo: str, files: dict[str, str]) -> Path:
    """A directory laid out like / : proc/self/{cgroup,mountinfo} and the cgroup files given."""
    for rel, text in {"proc/self/cgroup": membership, "proc/self/mountinfo": mountinfo, **files}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))


# ----------------------------------------------------------------------------- usable_cpus
def test_cgroup_v2_quota_of_one_and_a_half_cores_gives_two(tmp_path, eight_cores):
    root = fake_root(tmp_path, "0::/user.slice/job-7\n", V2_MOUNT,
                     {"sys/fs/cgroup/user.slice/job-7/cpu.max": "150000 100000\n"})  # fmt: skip
    assert hardware.cgroup_cpu_quota(root) == 1.5
    assert hardware.usable_cpus(root) == 2


def test_cgroup_v2_limit_on_an_ancestor_applies(tmp_path, eight_cores):
    root = fake_root(tmp_path, "0::/user.slice/job-7\n", V2_MOUNT, {
        "sys/fs/cgroup/user.slice/job-7/cpu.max": "max 100000\n",
        "sys/fs/cgroup/user.slice/cpu.max": "300000 100000\n",
    })  # fmt: skip
    assert hardware.usable_cpus(root) == 3


def test_cgroup_v2_without_a_limit_leaves_the_affinity_mask(tmp_path, eight_cores):
    root = fake_root(tmp_path, "0::/\n", V2_MOUNT, {"sys/fs/cgroup/cpu.max": "max 100000\n"})
    assert hardware.cgroup_cpu_quota(root) is None
    assert hardware.usable_cpus(root) == 8


def test_cgroup_v1_quota_in_a_container_whose_mount_root_is_its_own_cgroup(tmp_path, eight_cores):
    # Docker without a cgroup namespace: /proc/self/cgroup names the host path, the mount shows it as /
    mountinfo = "41 31 0:37 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
    root = fake_root(tmp_path, "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n", mountinfo, {
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "400000\n",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    })  # fmt: skip
    assert hardware.usable_cpus(root) == 4


def test_cgroup_v1_unlimited_quota_leaves_the_affinity_mask(tmp_path, eight_cores):
    mountinfo = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
    root = fake_root(tmp_path, "1:cpu:/\n", mountinfo,
                     {"sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n", "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"})  # fmt: skip
    assert hardware.usable_cpus(root) == 8


def test_a_quota_above_the_affinity_mask_leaves_the_mask(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    root = fake_root(tmp_path, "0::/\n", V2_MOUNT, {"sys/fs/cgroup/cpu.max": "800000 100000\n"})
    assert hardware.usable_cpus(root) == 2


def test_no_cgroup_files_means_no_quota(tmp_path, eight_cores):
    assert hardware.cgroup_cpu_quota(tmp_path) is None
    assert hardware.usable_cpus(tmp_path) == 8


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity masks")
def test_a_process_restricted_to_one_core_may_use_one():
    one_core = min(os.sched_getaffinity(0))
    proc = subprocess.run([sys.executable, "-c", "from smallscale.hardware import usable_cpus; print(usable_cpus())"],
                          preexec_fn=lambda: os.sched_setaffinity(0, {one_core}), capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.stdout.strip() == "1"


# ----------------------------------------------------------------------------- the trainer's threads
def tiny_run(dataset: Path, out: Path):
    return load_run_config(None, [
        f"data.path={dataset}", f"out={out}", "model.preset=null", "model.n_layer=1", "model.n_head=2",
        "model.d_model=32", "model.seq_len=32", "train.steps=2", "train.global_batch_tokens=256", "train.micro_batch=8",
        "train.precision=fp32", "train.device=cpu",
    ])  # fmt: skip


@pytest.fixture
def torch_threads():
    """Restores torch's thread count after a test that trains in this process."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_cpu_run_uses_one_thread_per_usable_core_and_records_it(tiny_dataset, tmp_path, monkeypatch, torch_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware, "usable_cpus", lambda root="/": 1)  # e.g. a 1-core cgroup quota
    torch.set_num_threads(3)  # torch's default counts the affinity mask, not the quota
    train(tiny_run(tiny_dataset, tmp_path / "r"), progress=False)
    assert torch.get_num_threads() == 1
    assert json.loads((tmp_path / "r" / "env.json").read_text())["torch_threads"] == 1


def test_a_caller_that_chose_fewer_threads_keeps_them(tiny_dataset, tmp_path, monkeypatch, torch_threads):
    # e.g. two training processes side by side, each told torch.set_num_threads(1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware, "usable_cpus", lambda root="/": 2)
    torch.set_num_threads(1)
    train(tiny_run(tiny_dataset, tmp_path / "r"), progress=False)
    assert torch.get_num_threads() == 1


def test_omp_num_threads_set_by_the_user_is_kept(tiny_dataset, tmp_path, monkeypatch, torch_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(hardware, "usable_cpus", lambda root="/": 1)
    torch.set_num_threads(3)  # what torch makes of OMP_NUM_THREADS=3 at import
    train(tiny_run(tiny_dataset, tmp_path / "r"), progress=False)
    assert json.loads((tmp_path / "r" / "env.json").read_text())["torch_threads"] == 3


# ----------------------------------------------------------------------------- the pool's shares
def test_two_workers_on_two_cores_get_one_thread_each():
    envs = [worker_env(slot, 2, 2, 0, {"PATH": "/bin"}) for slot in range(2)]
    assert [(e["OMP_NUM_THREADS"], e["MKL_NUM_THREADS"]) for e in envs] == [("1", "1"), ("1", "1")]
    assert all("CUDA_VISIBLE_DEVICES" not in e and e["PATH"] == "/bin" for e in envs)


def test_cores_that_do_not_divide_evenly_go_to_the_first_workers():
    assert [worker_threads(slot, 3, 8) for slot in range(3)] == [3, 3, 2]


def test_more_workers_than_cores_get_one_thread_each():
    assert [worker_threads(slot, 5, 2) for slot in range(5)] == [1, 1, 1, 1, 1]


def test_gpu_workers_get_one_gpu_each_and_a_share_of_the_cores():
    envs = [worker_env(slot, 4, 16, 4, {}) for slot in range(4)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "2", "3"]
    assert [e["OMP_NUM_THREADS"] for e in envs] == ["4", "4", "4", "4"]


def test_a_users_omp_num_threads_reaches_every_worker_unchanged():
    envs = [worker_env(slot, 2, 8, 0, {"OMP_NUM_THREADS": "2"}) for slot in range(2)]
    assert [e["OMP_NUM_THREADS"] for e in envs] == ["2", "2"] and all("MKL_NUM_THREADS" not in e for e in envs)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(workers=st.integers(1, 64), cpus=st.integers(1, 256))
def test_shares_use_every_core_once_when_there_are_enough_cores(workers, cpus):
    shares = [worker_threads(slot, workers, cpus) for slot in range(workers)]
    assert min(shares) >= 1 and max(shares) - min(shares) <= 1
    assert sum(shares) == max(cpus, workers)


def test_default_pool_workers_on_a_cpu_machine():
    assert [default_cpu_workers(c) for c in (1, 2, 16)] == [1, 2, 16]


def test_more_workers_than_cores_warns_once(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(executors, "usable_cpus", lambda: 2)
    with pytest.warns(UserWarning, match=r"3 workers share 2 usable CPU cores.*--workers 2 or fewer") as warned:
        executors._run_processes(tmp_path, [], 3, gpus=0, progress=False, total=0)
    assert len(warned) == 1


def test_pool_starts_each_worker_with_its_share_of_the_cores(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(executors, "usable_cpus", lambda: 5)
    # A stand-in worker that records the thread settings it was started with.
    record = "import json, os, sys; json.dump({k: os.environ[k] for k in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS')}, open(sys.argv[1], 'w'))"
    monkeypatch.setattr(executors, "_worker_command", lambda study_dir, run_id: [sys.executable, "-c", record,
                                                                                   str(tmp_path / f"{run_id}.json")])  # fmt: skip
    runs = [RunSpec(id=f"run-{i}", axes={}, config={}, dataset="syn") for i in range(2)]
    executors._run_processes(tmp_path / "study", runs, 2, gpus=0, progress=False, total=2)
    seen = [json.loads((tmp_path / f"run-{i}.json").read_text()) for i in range(2)]
    assert seen == [{"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}, {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}]
