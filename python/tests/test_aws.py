"""The reference's AWS settings mapped to ours, against moto (started here on 127.0.0.1, as the
Rust tests start it; ``scripts/test`` installs it): ``eventbridge_bus_name``/``aws_region``
reach EventBridge through the outbox, ``s3_bucket``/``s3_prefix``/``auto_upload`` upload through
the queue."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request

import pytest

from conftest import free_port
from eks_upgrade_agent import ArtifactStatus, TaskType


@pytest.fixture
def moto(monkeypatch):
    exe = shutil.which("moto_server")
    assert exe, "moto_server is not on PATH: pip install 'moto[server]' (scripts/test does)"
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, "moto_server exited"
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "moto_server did not answer within 30 s"
            time.sleep(0.1)
    for k, v in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    yield url
    proc.terminate()
    proc.wait(timeout=15)


def boto(url: str, code: str):
    """Runs ``code`` with boto3 clients (``events``, ``sqs``, ``s3``) in the system python (where
    moto and boto3 live); returns what it prints as JSON."""
    script = (
        "import boto3, json\n"
        f"kw = dict(endpoint_url={url!r}, region_name='eu-west-1', aws_access_key_id='testing', "
        "aws_secret_access_key='testing')\n"
        "events = boto3.client('events', **kw)\nsqs = boto3.client('sqs', **kw)\ns3 = boto3.client('s3', **kw)\n"
        + code
    )
    p = subprocess.run(["python3", "-c", script], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout) if p.stdout.strip() else None


def test_eventbridge_bus_name_notifies_through_the_outbox(local, moto):
    queue = boto(moto, (
        "events.create_event_bus(Name='upgrade-events')\n"
        "q = sqs.create_queue(QueueName='n')['QueueUrl']\n"
        "arn = sqs.get_queue_attributes(QueueUrl=q, AttributeNames=['QueueArn'])['Attributes']['QueueArn']\n"
        "events.put_rule(Name='r', EventBusName='upgrade-events', EventPattern=json.dumps({'source': ['eks-upgrade-agent']}))\n"
        "events.put_targets(Rule='r', EventBusName='upgrade-events', Targets=[{'Id': 'q', 'Arn': arn}])\n"
        "print(json.dumps(q))\n"))
    tracker = local.tracker(eventbridge_bus_name="upgrade-events", aws_region="eu-west-1")
    assert tracker.get_system_info()["eventbridge"] == {"enabled": True, "bus_name": "upgrade-events"}
    tracker.start_upgrade("Initialization")
    tracker.add_task("t", "T", TaskType.UPGRADE_STEP)
    tracker.start_task("t")
    tracker.complete_task("t")
    tracker.complete_upgrade()
    tracker.cleanup()
    got, deadline = [], time.monotonic() + 30
    while time.monotonic() < deadline:
        got += boto(moto, (
            f"r = sqs.receive_message(QueueUrl={queue!r}, MaxNumberOfMessages=10, WaitTimeSeconds=0)\n"
            "out = []\n"
            "for m in r.get('Messages', []):\n"
            "    out.append(json.loads(m['Body']))\n"
            f"    sqs.delete_message(QueueUrl={queue!r}, ReceiptHandle=m['ReceiptHandle'])\n"
            "print(json.dumps(out))\n"))
        if len(got) >= 4:
            break
        time.sleep(0.3)
    kinds = [m["detail-type"] for m in got]
    assert kinds == ["upgrade.started", "task.started", "task.completed", "upgrade.completed"], kinds
    assert all(m["detail"]["upgrade_id"] == "upgrade-123" for m in got)


def test_s3_settings_upload_through_the_queue(local, moto, tmp_path):
    boto(moto, "s3.create_bucket(Bucket='team', CreateBucketConfiguration={'LocationConstraint': 'eu-west-1'})\n")
    m = local.manager(s3_bucket="team", s3_prefix="agents/x", aws_region="eu-west-1")
    s = m.create_session("u1", "prod")
    c = m.create_collection(s.session_id, "logs")
    files = []
    for i in range(3):
        f = tmp_path / f"f{i}.log"
        f.write_bytes(b"log %d\n" % i)
        files.append(m.add_artifact(s.session_id, c.collection_id, f))
    assert m.upload_artifact(s.session_id, files[0].artifact_id) is True
    a = m.search_artifacts(session_id=s.session_id, status=ArtifactStatus.UPLOADED)
    assert [x.artifact_id for x in a] == [files[0].artifact_id]
    assert a[0].s3_bucket == "team" and a[0].s3_key == f"agents/x/{s.session_id}/{c.collection_id}/f0.log"
    assert m.upload_artifact("other-session", files[1].artifact_id) is False
    # auto_upload: completing the session uploads the rest.
    auto = local.manager(s3_bucket="team", s3_prefix="agents/x", aws_region="eu-west-1", auto_upload=True)
    assert auto.complete_session(s.session_id)
    assert len(auto.search_artifacts(session_id=s.session_id, status=ArtifactStatus.UPLOADED)) == 3
    assert m.upload_session_artifacts(s.session_id) == {f.artifact_id: True for f in files}
    keys = boto(moto, "print(json.dumps(sorted(o['Key'] for o in s3.list_objects_v2(Bucket='team')['Contents'])))\n")
    assert f"agents/x/{s.session_id}/{c.collection_id}/f2.log" in keys
