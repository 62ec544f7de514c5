"""A real OpenSSH server on 127.0.0.1 for the device tests: Debian's sshd with a throwaway host key and user key, and
an ssh config file whose Host `loop` reaches it (what a user's ~/.ssh/config does for a Jetson)."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def have_sshd() -> bool:
    return os.access(SSHD, os.X_OK) and shutil.which("ssh") is not None and shutil.which("ssh-keygen") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sshd:
    """sshd -D on a free port; `start` and `stop` as often as a test needs (the keys and port stay)."""

    def __init__(self, where: Path):
        self.where = Path(where)
        self.where.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        for key in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.where / key)], check=True)
        (self.where / "authorized_keys").write_text((self.where / "user_key.pub").read_text())
        (self.where / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.where / 'host_key'}\n"
            f"AuthorizedKeysFile {self.where / 'authorized_keys'}\nPidFile {self.where / 'sshd.pid'}\n"
            "UsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\nLogLevel ERROR\n")
        self.config = self.where / "ssh_config"
        self.config.write_text(
            f"Host loop\n  HostName 127.0.0.1\n  Port {self.port}\n  User {getpass.getuser()}\n"
            f"  IdentityFile {self.where / 'user_key'}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.where / 'known_hosts'}\n  StrictHostKeyChecking accept-new\n"
            "  LogLevel ERROR\n")
        self.process: subprocess.Popen | None = None

    def start(self) -> Sshd:
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(exist_ok=True)  # root's sshd wants its privilege separation directory
        self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.where / "sshd_config")],
                                        stderr=open(self.where / "sshd.log", "a"))
        for _ in range(100):
            ok = subprocess.run(["ssh", "-F", str(self.config), "-o", "BatchMode=yes", "loop", "true"],
                                capture_output=True).returncode == 0
            if ok:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"sshd did not start: {(self.where / 'sshd.log').read_text()[-500:]}")

    def stop(self) -> None:
        """Kill the listening sshd: every new connection to the device is refused from now on."""
        if self.process:
            self.process.kill()
            self.process.wait()
            self.process = None
