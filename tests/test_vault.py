"""Secrets and the fleet CA key under ansible-vault: ansible-playbook from the deploy venv
(`make deploy-venv`), on localhost without containers, with a vault password file, renders the
roles' own templates and issues certificates from vaulted files and variables; the decrypted
values are what the roles use and the vaulted files stay encrypted."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.deploy_tools import DEPLOY_BIN, LOCAL_HOST, ROOT, ansible_playbook, controller_env

VAULT_HEADER = "$ANSIBLE_VAULT;1.1;AES256"
ADMIN_TOKEN = "admin-token-from-the-vault-0123456789abcdefg"
ENROLLMENT = "enrollment-secret-from-the-vault-0123456789"
AGENT_ENROLLMENT = "agent-enrollment-secret-from-the-vault-01234"
# What the test adds to a copy of each role (tasks/render.yml): the NS role renders its real
# configuration template; the task server and agent roles write the enrollment secret they resolve.
NS_RENDER = """
- name: Render the NS configuration
  ansible.builtin.template:
    src: notification-server.toml.j2
    dest: "{{ out_dir }}/notification-server.toml"
    mode: "0600"
"""
SECRET_RENDER = """
- name: Write the enrollment secret the role resolves
  ansible.builtin.copy:
    content: "{{ %s_enrollment_secret }}"
    dest: "{{ out_dir }}/%s.secret"
    mode: "0600"
"""
PLAYBOOK = """
- name: Render with the roles' defaults
  hosts: fleet
  gather_facts: false
  tasks:
    - name: The NS role's configuration
      ansible.builtin.include_role:
        name: tickle_notification_server
        tasks_from: render
    - name: The task server role's secret
      ansible.builtin.include_role:
        name: tickle_task_server
        tasks_from: render
    - name: The agent role's secret
      ansible.builtin.include_role:
        name: tickle_client_task_agent
        tasks_from: render
"""
ISSUE_PLAYBOOK = """
- name: Issue certificates from the fleet CA
  hosts: fleet
  gather_facts: false
  tasks:
    - name: The certificate role's controller side
      ansible.builtin.include_role:
        name: tickle_certificate
        tasks_from: issue
      vars:
        tickle_certificate_dir: "{{ inventory_dir }}/.secrets"
        tickle_certificate_name: ns1
"""


class Controller:
    """A fleet inventory of one local host, a vault password file and the deploy venv's tools."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.inventory = tmp / "inventory"
        self.secrets = self.inventory / ".secrets"
        self.out = tmp / "out"
        for d in (self.secrets, self.out, self.inventory / "group_vars" / "all"):
            d.mkdir(parents=True, exist_ok=True)
        self.password_file = tmp / "vault-password"
        self.password_file.write_text("correct horse battery staple\n")
        self.password_file.chmod(0o600)
        hosts = {
            "all": {
                "children": {"fleet": {"hosts": {"localhost": None}}},
                "vars": {**LOCAL_HOST, "out_dir": str(self.out)},
            }
        }
        (self.inventory / "hosts.yml").write_text(yaml.safe_dump(hosts))
        self.roles = tmp / "roles"
        for role in (
            "tickle_notification_server",
            "tickle_task_server",
            "tickle_client_task_agent",
        ):
            shutil.copytree(ROOT / "roles" / role, self.roles / role)
            render = (
                NS_RENDER if role == "tickle_notification_server" else SECRET_RENDER % (role, role)
            )
            (self.roles / role / "tasks" / "render.yml").write_text(render)
        self.env = controller_env(tmp, self.roles)

    def vault(self, *args: str, stdin: str | None = None) -> str:
        cmd = [str(DEPLOY_BIN / "ansible-vault"), *args]
        run = subprocess.run(
            [*cmd, "--vault-password-file", str(self.password_file)],
            env=self.env, input=stdin, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        return run.stdout

    def encrypt_file(self, path: Path, content: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        self.vault("encrypt", str(path))
        assert path.read_text().startswith(VAULT_HEADER)

    def playbook(self, text: str, *, vault: bool = True) -> subprocess.CompletedProcess[str]:
        book = self.tmp / "playbook.yml"
        book.write_text(text)
        args = ["--vault-password-file", str(self.password_file)] if vault else []
        return ansible_playbook(self.env, self.inventory / "hosts.yml", book, *args)

    def render(self) -> tuple[dict[str, object], dict[str, str]]:
        run = self.playbook(PLAYBOOK)
        assert run.returncode == 0, run.stdout + run.stderr
        config = tomllib.loads((self.out / "notification-server.toml").read_text())
        roles = {"task_server": "tickle_task_server", "agent": "tickle_client_task_agent"}
        return config, {k: (self.out / f"{r}.secret").read_text() for k, r in roles.items()}


@pytest.fixture
def controller(tmp_path: Path) -> Controller:
    return Controller(tmp_path)


def test_generated_secret_files_encrypted_in_place_are_decrypted(controller: Controller) -> None:
    # what an operator does to the secrets the roles generated: ansible-vault encrypt them in place
    controller.encrypt_file(controller.secrets / "admin-token", ADMIN_TOKEN + "\n")
    controller.encrypt_file(controller.secrets / "task-server-enrollment-secret", ENROLLMENT + "\n")
    controller.encrypt_file(controller.secrets / "agent-enrollment-secret", AGENT_ENROLLMENT + "\n")
    config, secrets = controller.render()
    assert config["admin_token"] == ADMIN_TOKEN
    assert config["enrollment_secret"] == ENROLLMENT
    assert secrets == {"task_server": ENROLLMENT, "agent": AGENT_ENROLLMENT}
    # read, never regenerated over
    for name in ("admin-token", "task-server-enrollment-secret", "agent-enrollment-secret"):
        assert (controller.secrets / name).read_text().startswith(VAULT_HEADER)


def test_plain_secret_files_are_still_generated_and_reused(controller: Controller) -> None:
    config, secrets = controller.render()
    token = (controller.secrets / "admin-token").read_text().strip()
    enrollment = (controller.secrets / "task-server-enrollment-secret").read_text().strip()
    agents = (controller.secrets / "agent-enrollment-secret").read_text().strip()
    assert len(token) == 43
    assert enrollment != agents
    assert config["admin_token"] == token
    assert secrets == {"task_server": enrollment, "agent": agents}
    assert controller.render()[0]["admin_token"] == token


def test_vaulted_variables_in_group_vars(controller: Controller) -> None:
    group_vars = controller.inventory / "group_vars" / "all"
    # a whole vaulted variable file, and a variable encrypted with encrypt_string
    controller.encrypt_file(group_vars / "vault.yml", f"vault_tickle_admin_token: {ADMIN_TOKEN}\n")
    inline = controller.vault(
        "encrypt_string", "--stdin-name", "vault_tickle_enrollment_secret", stdin=ENROLLMENT
    )
    (group_vars / "main.yml").write_text(
        inline
        + "tickle_notification_server_admin_token: '{{ vault_tickle_admin_token }}'\n"
        + "tickle_notification_server_enrollment_secret: '{{ vault_tickle_enrollment_secret }}'\n"
        + "tickle_task_server_enrollment_secret: '{{ vault_tickle_enrollment_secret }}'\n"
        + "tickle_client_task_agent_enrollment_secret: '{{ vault_tickle_enrollment_secret }}'\n"
    )
    config, secrets = controller.render()
    assert config["admin_token"] == ADMIN_TOKEN
    assert config["enrollment_secret"] == ENROLLMENT
    assert secrets == {"task_server": ENROLLMENT, "agent": ENROLLMENT}
    assert not (controller.secrets / "admin-token").exists()  # nothing generated beside them


def test_a_vaulted_secret_without_the_password_stops_the_run(controller: Controller) -> None:
    controller.encrypt_file(controller.secrets / "admin-token", ADMIN_TOKEN + "\n")
    run = controller.playbook(PLAYBOOK, vault=False)
    assert run.returncode != 0
    assert "Attempting to decrypt but no vault secrets found" in run.stdout + run.stderr
    assert not (controller.out / "notification-server.toml").exists()


def _pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _public(key: ec.EllipticCurvePrivateKey | x509.Certificate) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_certificates_are_issued_from_a_vaulted_fleet_ca_key(controller: Controller) -> None:
    ca_key, host_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    controller.encrypt_file(controller.secrets / "ca" / "tickle-ca.key", _pem(ca_key))
    controller.encrypt_file(controller.secrets / "certs" / "ns1.key", _pem(host_key))
    for _ in range(2):  # and again: the vaulted keys are kept, the certificates reused
        run = controller.playbook(ISSUE_PLAYBOOK)
        assert run.returncode == 0, run.stdout + run.stderr
    ca = x509.load_pem_x509_certificate((controller.secrets / "ca" / "tickle-ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((controller.secrets / "certs" / "ns1.crt").read_bytes())
    assert _public(ca) == _public(ca_key)  # the fleet CA is the vaulted key's
    assert _public(cert) == _public(host_key)  # the host certificate is for the vaulted host key
    cert.verify_directly_issued_by(ca)  # and signed by the vaulted CA key
    assert "changed=0" in run.stdout
    for key in ("ca/tickle-ca.key", "certs/ns1.key"):
        assert (controller.secrets / key).read_text().startswith(VAULT_HEADER)
