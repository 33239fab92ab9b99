"""A real Orthanc PACS on loopback for the tests: started per session, stopped by its PID."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import requests
from dicom_factory import require_tool

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OrthancServer:
    """Orthanc with a minimal configuration: loopback only; HTTP basic authentication when
    ``users`` (name: password) are given, else none."""

    aet = "ORTHANC"

    def __init__(self, directory: Path, users: dict[str, str] | None = None) -> None:
        self.executable = require_tool("Orthanc", "orthanc")
        self.directory = directory
        self.users = users or {}
        self.auth = next(iter(self.users.items()), None)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> OrthancServer:
        config = {
            "Name": "instructx2x-test",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "StorageDirectory": str(self.directory / "storage"),
            "IndexDirectory": str(self.directory / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": True,
            "HttpsVerifyPeers": False,
            "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        path = self.directory / "orthanc.json"
        path.write_text(json.dumps(config))
        self.log = open(self.directory / "orthanc.log", "a")
        self.process = subprocess.Popen(
            [self.executable, str(path)], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.directory / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/system", timeout=1, auth=self.auth).ok:
                    return self
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not answer within 30 s")

    @property
    def has_dicomweb(self) -> bool:
        return DICOMWEB_PLUGIN.exists()

    def instance_file(self, sop_instance_uid: str) -> bytes:
        """The stored file of an instance, read back over Orthanc's REST API."""
        found = requests.post(
            f"{self.url}/tools/lookup", data=sop_instance_uid, timeout=10, auth=self.auth
        ).json()
        ids = [item["ID"] for item in found if item["Type"] == "Instance"]
        assert ids, f"instance {sop_instance_uid} is not in Orthanc"
        return requests.get(f"{self.url}/instances/{ids[0]}/file", timeout=30, auth=self.auth).content

    def study_instances(self, study_instance_uid: str) -> list[str]:
        """The SOPInstanceUIDs Orthanc holds in a study."""
        found = requests.post(
            f"{self.url}/tools/find",
            json={"Level": "Instance", "Query": {"StudyInstanceUID": study_instance_uid}, "Expand": True},
            timeout=10,
            auth=self.auth,
        ).json()
        return [item["MainDicomTags"]["SOPInstanceUID"] for item in found]

    def instance_count(self) -> int:
        return len(requests.get(f"{self.url}/instances", timeout=10, auth=self.auth).json())

    def upload(self, path: Path) -> None:
        """Store a DICOM file through Orthanc's REST API."""
        requests.post(
            f"{self.url}/instances", data=Path(path).read_bytes(), timeout=30, auth=self.auth
        ).raise_for_status()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        self.process = None
