"""Processes on one machine share its CPU cores, even when each was started on its own.

Each "worker" below is a real process that registers with stylepipe.ops.cores and answers
commands on stdin; TEST_CPUS sets the core count that process sees. The tests of torch's
thread count use this test's own process as the worker that applies its share.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stylepipe.config import PrepareConfig
from stylepipe.data import prepare as prepare_module
from stylepipe.data.prepare import prepare
from stylepipe.ops import cores

DRIVER = """
import os, sys
if os.environ.get("TEST_CPUS"):
    os.cpu_count = lambda: int(os.environ["TEST_CPUS"])
from stylepipe.ops import cores
with cores.CoreShare():
    print("ready", flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "share":
            print(cores.share(), flush=True)
        elif command == "exit":
            break
"""


class Worker:
    def __init__(self, folder: Path, cpus: int, **env: str):
        environ = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        environ.update({cores.FOLDER_ENV: str(folder), "TEST_CPUS": str(cpus), **env})
        self.process = subprocess.Popen([sys.executable, "-c", DRIVER], env=environ, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        assert self.ask(None) == "ready"

    def send(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def ask(self, command: str | None) -> str:
        if command is not None:
            self.send(command)
        answer = self.process.stdout.readline().strip()
        assert answer, f"the worker exited (code {self.process.poll()})"
        return answer

    def share(self) -> int:
        return int(self.ask("share"))

    def leave(self) -> None:
        self.process.stdin.write("exit\n")
        self.process.stdin.close()
        assert self.process.wait(timeout=30) == 0

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture(autouse=True)
def _threads_not_fixed(monkeypatch):
    """These tests are about how stylepipe sets the thread count: make test fixes it for its own
    worker processes (conftest.py), a user here has not."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.fixture
def workers(tmp_path, monkeypatch):
    """Start workers registered in tmp_path; every one still running is killed afterwards."""
    monkeypatch.setenv(cores.FOLDER_ENV, str(tmp_path))
    started: list[Worker] = []

    def start(cpus: int, **env: str) -> Worker:
        started.append(Worker(tmp_path, cpus, **env))
        return started[-1]

    yield start
    for worker in started:
        if worker.process.poll() is None:
            worker.kill()


def registrations(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.worker"))


def test_workers_started_on_their_own_each_get_their_share(workers, tmp_path, monkeypatch):
    three = [workers(cpus=6) for _ in range(3)]
    assert [w.share() for w in three] == [2, 2, 2]
    assert cores.live_processes() == 3
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert cores.share() == 1  # an unregistered process (prepare started alone) counts itself too


def test_a_killed_worker_stops_counting_and_its_file_is_removed(workers, tmp_path):
    first, second = workers(cpus=4), workers(cpus=4)
    assert first.share() == 2
    second.kill()  # SIGKILL: no cleanup ran; the kernel released its lock
    assert len(registrations(tmp_path)) == 2
    assert first.share() == 4
    assert len(registrations(tmp_path)) == 1


@pytest.fixture
def this_process(tmp_path, monkeypatch):
    """This test's process as a fresh worker on 4 cores; torch's thread count restored after."""
    monkeypatch.setenv(cores.FOLDER_ENV, str(tmp_path))
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(cores, "_torch_start", None)  # as if stylepipe had not set torch's threads yet
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    with cores.CoreShare():
        yield
    torch.set_num_threads(threads)


def test_the_first_worker_gives_cores_back_when_others_join_and_takes_them_back(workers, this_process):
    torch.set_num_threads(4)
    assert cores.set_torch_threads() == torch.get_num_threads() == 4
    second = workers(cpus=4)
    assert cores.set_torch_threads() == torch.get_num_threads() == 2
    third = workers(cpus=4)
    assert cores.set_torch_threads() == torch.get_num_threads() == 1
    assert second.share() == third.share() == 1
    second.leave()
    third.kill()
    assert cores.set_torch_threads() == torch.get_num_threads() == 4


def test_never_more_threads_than_torch_had_before_stylepipe_changed_them(this_process):
    torch.set_num_threads(1)  # MKL_NUM_THREADS=1, or torch's default where cores are hyperthreads
    assert cores.share() == 4
    assert cores.set_torch_threads() == torch.get_num_threads() == 1


def test_omp_num_threads_set_by_the_user_leaves_torch_alone(workers, this_process, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    torch.set_num_threads(3)
    workers(cpus=4)
    assert cores.share() == 2
    assert cores.set_torch_threads() == torch.get_num_threads() == 3


def test_one_process_counts_once_and_a_forked_child_counts_on_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv(cores.FOLDER_ENV, str(tmp_path))
    with cores.CoreShare(), cores.CoreShare():
        assert cores.live_processes() == 1
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # the child registers itself, then leaves its parent's file alone
            try:
                with cores.CoreShare():
                    os.write(write, str(cores.live_processes()).encode())
            finally:
                os._exit(0)
        os.close(write)
        seen_by_child = int(os.read(read, 16))
        os.waitpid(child, 0)
        os.close(read)
        assert seen_by_child == 2
        assert cores.live_processes() == 1
    assert cores.live_processes() == 0
    assert registrations(tmp_path) == []


class RecordingPool(prepare_module.ProcessPoolExecutor):
    sizes: list[int] = []

    def __init__(self, max_workers: int, **kwargs):
        RecordingPool.sizes.append(max_workers)
        super().__init__(max_workers, **kwargs)


def photos(folder: Path, count: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        gradient = np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None].repeat(64, 0).repeat(3, 2)
        noise = rng.integers(0, 40, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(gradient // 2 + noise).save(folder / f"photo_{i}.png")
    return folder


def test_prepare_decodes_with_its_share_of_the_cores_while_workers_train(workers, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    monkeypatch.setattr(prepare_module, "ProcessPoolExecutor", RecordingPool)
    RecordingPool.sizes = []
    workers(cpus=6)  # a worker training on this machine
    settings = PrepareConfig(image_size=32, min_size=32, val_fraction=0.2)
    prepare(photos(tmp_path / "photos", 6), tmp_path / "out", settings, progress=False, cores=cores.MACHINE)
    assert RecordingPool.sizes == [3]  # prepare and the worker: 6 cores // 2
    prepare(tmp_path / "photos", tmp_path / "again", settings.model_copy(update={"workers": 4}), progress=False,
            cores=cores.MACHINE)  # fmt: skip
    assert RecordingPool.sizes == [3, 4]  # prepare.workers, set by the user, wins
