"""`ray job submit` against a real head started with `ray start`, from an environment
where the project is not installed: the job must run from the uploaded working dir."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile

import psutil
import pyarrow.fs as pafs
import pytest
import yaml
from deltalake import DeltaTable

from tests.conftest import ALL, AWS_TEST_ENV, BROKEN

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A venv that sees the dependencies (ray, torch, ...) but not this project."""
    root = tmp_path_factory.mktemp("bare")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = str(root / "venv" / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # A path added by a .pth file gets no .pth processing of its own, so the project's
    # editable-install hook in the main venv stays inactive here.
    with open(os.path.join(site, "deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    probe = subprocess.run(
        [python, "-c", "import ray, torch; import pipeline"], cwd=root, capture_output=True, text=True
    )
    assert "No module named 'pipeline'" in probe.stderr, probe.stderr
    return python


@pytest.fixture(scope="module")
def ray_head(bare_python, tmp_path_factory):
    """`ray start --head --num-cpus 2` with its dashboard on 127.0.0.1; stopped by process id."""
    home = tmp_path_factory.mktemp("home")  # Ray 2.60 writes its auth token under ~/.ray
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's unix sockets live here
    env = {
        **os.environ,
        **AWS_TEST_ENV,
        "HOME": str(home),
        "PATH": os.path.dirname(bare_python) + os.pathsep + os.environ["PATH"],
    }
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    ray = [bare_python, "-m", "ray.scripts.scripts"]
    # As on a real head: a token exists, so `ray start` turns token authentication on.
    subprocess.run([*ray, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    subprocess.run(
        [
            *ray,
            "start",
            "--head",
            "--num-cpus",
            "2",
            "--port",
            str(free_port()),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--ray-client-server-port",
            str(free_port()),
            "--temp-dir",
            temp_dir,
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    client_env = {**env, "RAY_AUTH_MODE": "token"}  # the job client needs it with Ray 2.60's token auth
    try:
        yield ray, f"http://127.0.0.1:{dashboard}", client_env
    finally:
        stop_processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_processes_under(temp_dir: str) -> None:
    """Ends the head's processes (and only those): each names our temp dir on its command line."""
    ours = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in arg for arg in p.info["cmdline"] or []):
                ours.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in ours:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(ours, timeout=15)
    for p in alive:
        p.kill()


def submit(ray_head, *job_args, cwd=ROOT):
    ray, address, env = ray_head
    return subprocess.run(
        [
            *ray,
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps({"excludes": yaml.safe_load(open(f"{ROOT}/jobs/runtime_env.yaml"))["excludes"]}),
            "--",
            "python",
            *job_args,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_job_submit_runs_the_uploaded_code(ray_head, images_dir, resnet18_checkpoint, tmp_path):
    out = str(tmp_path / "features")
    proc = submit(
        ray_head,
        "jobs/extract_features.py",
        "--input",
        images_dir,
        "--output",
        out,
        "--model",
        "resnet18",
        "--weights",
        resnet18_checkpoint,
        "--batch-size",
        "8",
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "succeeded" in proc.stdout.lower()
    # The job imported the project from Ray's copy of the working dir.
    assert "runtime_resources/working_dir_files" in proc.stdout, proc.stdout[-3000:]
    table = (
        DeltaTable(out)
        .to_pyarrow_dataset(filesystem=pafs.SubTreeFileSystem(out, pafs.LocalFileSystem()))
        .to_table()
    )
    assert sorted(table["id"].to_pylist()) == sorted(ALL)
    assert table["status"].to_pylist().count("error") == len(BROKEN)
    assert "embedding" in table.column_names and "class_index" not in table.column_names


def test_a_failed_run_makes_the_job_fail(ray_head, tmp_path):
    proc = submit(
        ray_head, "jobs/classify.py", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")
    )
    assert proc.returncode != 0
    assert f"error: input not found: {tmp_path / 'missing'}" in proc.stdout + proc.stderr
    assert "failed" in (proc.stdout + proc.stderr).lower()


def test_runtime_env_file_is_valid_and_has_no_secrets():
    from ray.runtime_env import RuntimeEnv

    with open(os.path.join(ROOT, "jobs/runtime_env.yaml")) as f:
        text = f.read()
    env = RuntimeEnv(**yaml.safe_load(text))
    assert ".venv/" in env["excludes"]
    assert not [p for p in env["pip"] if p.split("[")[0].split("<")[0].split(">")[0].strip() == "ray"]
    assert "AWS_SECRET_ACCESS_KEY" not in text and "AWS_ACCESS_KEY_ID" not in text
