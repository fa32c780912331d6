"""Running the deploy venv's Ansible (`make deploy-venv`) on localhost from tests: the
environment of `make`'s DEPLOY_ENV, isolated in a temporary directory, and ansible-playbook."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_BIN = ROOT / ".venv-deploy" / "bin"
COLLECTIONS = ROOT / "build" / "collections"
# Inventory variables of a host that is this machine.
LOCAL_HOST = {
    "ansible_connection": "local",
    "ansible_python_interpreter": str(DEPLOY_BIN / "python"),
}


def controller_env(tmp: Path, *roles_paths: Path) -> dict[str, str]:
    """The environment to run the deploy venv's tools in: the repo's roles (after `roles_paths`)
    and collections, Ansible's own files under `tmp`."""
    assert (DEPLOY_BIN / "ansible-playbook").exists(), "no .venv-deploy: run make deploy-venv"
    assert (COLLECTIONS / "ansible_collections" / "community" / "crypto").is_dir(), (
        "no collections in build/collections: run make deploy-venv"
    )
    return {
        **os.environ,
        "PATH": f"{DEPLOY_BIN}:{os.environ['PATH']}",
        "ANSIBLE_ROLES_PATH": ":".join(map(str, [*roles_paths, ROOT / "roles"])),
        "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
        "ANSIBLE_HOME": str(tmp / "ansible-home"),
        "ANSIBLE_FORCE_COLOR": "false",
        "ANSIBLE_NOCOLOR": "true",
    }


def ansible_playbook(
    env: dict[str, str], inventory: Path, playbook: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    cmd = [str(DEPLOY_BIN / "ansible-playbook"), "-i", str(inventory), str(playbook), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
