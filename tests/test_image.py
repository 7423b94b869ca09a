"""The CPU image for real: deploy/test-image.sh builds deploy/Dockerfile.cpu with podman on a local
Debian base, runs the container (health, a completion, a chat with a mixture, SIGTERM during a stream),
brings up docker-compose.yml's cpu profile through podman-compose, and removes what it made.

It takes 5 to 9 minutes on 2 cores (debootstrap, the build, the first start's model conversion,
a 30 s drain, the compose profile, cleanup); its timings are printed as it goes. Where podman cannot run, the script says why and the test skips with that reason.
POLICYMIX_SKIP_IMAGE_TEST=1 skips it on purpose (a quick local run of the suite).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "test-image.sh"
SKIPPED = 77  # the script's exit status when podman cannot run here


@pytest.mark.timeout(3600)
def test_cpu_image_and_compose_profile_run_with_podman(capsys):
    if os.environ.get("POLICYMIX_SKIP_IMAGE_TEST") == "1":
        pytest.skip("POLICYMIX_SKIP_IMAGE_TEST=1")
    # The venv's python runs the smoke requests; its bin holds the pinned podman-compose.
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PYTHON": sys.executable, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    lines = []
    with subprocess.Popen(["bash", str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env, cwd=REPO) as proc:
        for line in proc.stdout:
            lines.append(line)
            with capsys.disabled():  # progress and timings in the CI log as they happen
                print(f"test-image.sh: {line}", end="", flush=True)
    out = "".join(lines)
    if proc.returncode == SKIPPED:
        pytest.skip(next((ln for ln in reversed(lines) if ln.startswith("SKIP:")), out[-500:]).strip())
    assert proc.returncode == 0, out[-8000:]
    assert "PASS:" in lines[-2] + lines[-1], out[-2000:]


def test_podman_settings_parse_and_agree_with_the_script():
    """Cheap, everywhere: the files the script passes to podman and pip parse, and name one work folder."""
    import configparser
    import re
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")

    conf = REPO / "deploy" / "podman"
    containers = tomllib.loads((conf / "containers.conf").read_text(encoding="utf-8"))
    storage = tomllib.loads((conf / "storage.conf").read_text(encoding="utf-8"))
    registries = tomllib.loads((conf / "registries.conf").read_text(encoding="utf-8"))
    assert containers["engine"]["runtime"] == "runc"
    assert {u.split("=")[0] for u in containers["containers"]["default_ulimits"]} == {"nofile", "nproc"}
    assert registries["unqualified-search-registries"] == []

    work = re.search(r"^WORK=(\S+)", SCRIPT.read_text(encoding="utf-8"), re.M).group(1)
    for path in (storage["storage"]["graphroot"], containers["network"]["network_config_dir"]):
        assert Path(path).parent == Path(work), f"{path} is outside the script's work folder {work}"

    pip = configparser.ConfigParser()
    pip.read(conf / "pip.conf")
    assert pip["global"]["retries"] == "0" and pip["global"]["find-links"] == "/mnt"
