"""The Kubernetes manifests and the container image definition in ``deploy/``.

Each manifest is checked against the Kubernetes API schemas by ``kubernetes-validate`` (strict:
unknown fields are errors), then the fields the server needs are checked against each other and
against the binary itself: the port it listens on, the probe path it answers, the settings it
reads from the Secret, the token file it is pointed at.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def docs() -> dict[str, dict]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            out[doc["kind"]] = doc
    return out


def test_manifests_validate_against_the_kubernetes_schemas():
    files = sorted(str(p) for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert len(files) >= 6, files
    run = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--no-warn", *files],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # One "passed" line per manifest: a file the validator skipped would not pass silently.
    assert len(re.findall(r"\bpassed\b", run.stdout + run.stderr)) == len(files), run.stdout + run.stderr


def test_the_validator_catches_a_broken_manifest(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\nspec:\n  replicaz: 3\n")
    run = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", str(bad)], capture_output=True, text=True
    )
    assert run.returncode != 0, run.stdout + run.stderr


def test_kustomization_lists_every_manifest_but_the_example_secret():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == present


def test_deployment_fits_the_server(eua_bin):
    d = docs()
    dep, svc, pdb, secret = d["Deployment"], d["Service"], d["PodDisruptionBudget"], d["Secret"]
    spec = dep["spec"]
    assert spec["replicas"] == 3
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    # The budget keeps a majority while a node drains, and lets one replica go.
    assert 1 <= pdb["spec"]["minAvailable"] < spec["replicas"]

    (c,) = spec["template"]["spec"]["containers"]
    args = c["args"]
    assert args[0] == "serve"
    listen = args[args.index("--listen") + 1]
    port = int(listen.rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == port
    assert svc["spec"]["ports"][0]["targetPort"] in ("http", port)
    for probe in ("readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/healthz"
        assert get["port"] in ("http", port)

    # Listening beyond loopback needs tokens: they come from the Secret, mounted as a file.
    token_file = args[args.index("--token-file") + 1]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    (tokens_volume,) = [n for n, v in volumes.items() if "secret" in v]
    item = volumes[tokens_volume]["secret"]["items"][0]
    assert f"{mounts[tokens_volume]}/{item['path']}" == token_file
    assert volumes[tokens_volume]["secret"]["secretName"] == secret["metadata"]["name"]
    assert item["key"] in secret["stringData"]
    for line in secret["stringData"]["tokens"].splitlines():
        assert re.fullmatch(r"[^:\s]+:(read|write)", line), line

    # A read-only root file system leaves the server somewhere to write: the data dir (the blob
    # cache) and /tmp (spooled uploads) are volumes.
    if c["securityContext"].get("readOnlyRootFilesystem"):
        data_dir = next(e["value"] for e in c["env"] if e["name"] == "EUA_DATA_DIR")
        assert data_dir in mounts.values(), mounts
        assert "/tmp" in mounts.values(), mounts

    # Every setting the Deployment passes is one the binary reads.
    (ref,) = c["envFrom"]
    assert ref["secretRef"]["name"] == secret["metadata"]["name"]
    names = [k for k in secret["stringData"] if k.startswith("EUA_")] + [e["name"] for e in c["env"]]
    help_text = subprocess.run([eua_bin, "--help"], capture_output=True, text=True, check=True).stdout
    help_text += subprocess.run([eua_bin, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    for name in names:
        if name.startswith("EUA_"):
            assert name in help_text, f"{name} is not a setting of eks-upgrade-agent"
    assert "EUA_DATABASE_URL" in names and "EUA_S3_BUCKET" in names

    # The binary accepts the very arguments the Deployment gives it (the parser, not a server).
    check = subprocess.run([eua_bin, *args, "--help"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_containerfile_runs_the_server_as_non_root_on_the_manifest_port():
    text = (DEPLOY / "Containerfile").read_text()
    rust = re.search(r"FROM \S*rust:(\d+)\.(\d+)", text)
    assert rust, "the build stage uses the rust image"
    msrv = re.search(r'rust-version = "(\d+)\.(\d+)"', (ROOT / "Cargo.toml").read_text())
    assert (int(rust[1]), int(rust[2])) >= (int(msrv[1]), int(msrv[2]))
    assert "--locked" in text
    user = re.search(r"^USER (\d+)", text, re.M)
    assert user and int(user[1]) != 0
    dep = docs()["Deployment"]["spec"]["template"]["spec"]
    assert dep["securityContext"]["runAsUser"] == int(user[1])
    expose = re.search(r"^EXPOSE (\d+)", text, re.M)
    (c,) = dep["containers"]
    assert int(expose[1]) == c["ports"][0]["containerPort"]
