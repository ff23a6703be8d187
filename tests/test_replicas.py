"""Scale-out: two real `olora serve` replicas sharing one adapter store, behind a real nginx running the shipped
deploy/compose/nginx/nginx.conf (consistent hashing on X-Adapter-Id, next-upstream on failure). Every test runs
twice: the replicas share one directory (`directory`), or one bucket of an S3-protocol server on loopback and no
folder at all (`s3`: moto's server; each replica has its own local folder).

What is shown (CPU, tiny model, loopback only):
  - every request of one adapter lands on one replica, and both replicas get adapters (from their /metrics);
  - an adapter uploaded through one replica is servable by the other at once, without a restart;
  - a delete / an overwrite through one replica reaches the other within 5 s (its store watcher);
  - two concurrent uploads of one id through the two replicas: one 201, one 409, and the stored files are
    exactly the winner's;
  - SIGKILL of a replica under load: the balancer sends later requests to the survivor, nothing hangs, and
    every 200 answer equals the single-replica answer for that prompt and adapter.
"""
from __future__ import annotations

import concurrent.futures
import json
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer
from prometheus_client.parser import text_string_to_metric_families

from helpers import save_random_lora, save_tiny_checkpoint
from http_helpers import tar_gz
from server_process import Replica, stop_process
from test_deploy_validation import free_port, nginx_binary, nginx_config_for_test

pytestmark = pytest.mark.slow

PROMPTS = ["Return the number", "Open the file and"]
N_ADAPTERS = 8
MAX_NEW_TOKENS = 8
PROPAGATION_S = 5.0  # delete / overwrite through one replica must reach the other within this


class Balancer:
    """nginx with the shipped config, rewritten to listen on loopback and proxy to the two replicas."""

    def __init__(self, replicas: list[Replica], prefix: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_config_for_test(prefix, self.port, [r.port for r in replicas]))
        self.log_path = prefix / "nginx.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([nginx_binary(), "-e", "stderr", "-p", str(prefix), "-c", str(conf),
                                      "-g", "daemon off;"], stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"nginx exited: {self.log_path.read_text()[-3000:]}"
            try:
                if httpx.get(self.url + "/nginx-health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"nginx did not start: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGQUIT, 10)  # graceful: workers finish, then exit
        self._log.close()


class DirectoryStore:
    """The replicas' shared adapter directory, read as the tests check it."""

    def __init__(self, root: Path):
        self.path = root / "store"

    def replica_dir(self, i: int) -> Path:
        return self.path

    def env(self) -> dict:
        return {}

    def live(self, adapter_id: str) -> tuple[str, list[str], dict[str, bytes]]:
        """(live version, every version stored for the id, the live version's files by name)."""
        adapter_dir = self.path / adapter_id
        version = (adapter_dir / "CURRENT").read_text().strip()
        versions = [p.name for p in adapter_dir.iterdir() if p.is_dir()]
        return version, versions, {n: (adapter_dir / version / n).read_bytes() for n in ADAPTER_FILES}

    def staged(self) -> list[str]:
        """What writers left half-written."""
        return [p.name for p in (self.path / ".staging").iterdir()]

    def stop(self) -> None:
        pass


class BucketStore:
    """One bucket on moto's S3 server (a real HTTP server on loopback); no folder is shared."""

    BUCKET, PREFIX = "replicas", "adapters"

    def __init__(self, root: Path):
        self.root = root
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        self.credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1"}
        self.s3 = boto3.client("s3", endpoint_url=self.url, aws_access_key_id="testing",
                               aws_secret_access_key="testing", region_name="us-east-1")
        self.s3.create_bucket(Bucket=self.BUCKET)

    def replica_dir(self, i: int) -> Path:
        return self.root / f"local{i}"  # each replica's own cache of downloaded versions

    def env(self) -> dict:
        return {"OLORA_STORE": "s3", "OLORA_S3_BUCKET": self.BUCKET, "OLORA_S3_PREFIX": self.PREFIX,
                "OLORA_S3_ENDPOINT_URL": self.url, **self.credentials}

    def _read(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.BUCKET, Key=f"{self.PREFIX}/{key}")["Body"].read()

    def live(self, adapter_id: str) -> tuple[str, list[str], dict[str, bytes]]:
        version = json.loads(self._read(f"{adapter_id}/CURRENT"))["version"]
        listed = self.s3.list_objects_v2(Bucket=self.BUCKET, Prefix=f"{self.PREFIX}/{adapter_id}/versions/")
        versions = sorted({o["Key"].split("/")[3] for o in listed.get("Contents", [])})
        return version, versions, {n: self._read(f"{adapter_id}/versions/{version}/{n}") for n in ADAPTER_FILES}

    def staged(self) -> list[str]:
        return [p.name for i in (1, 2) for p in (self.replica_dir(i) / ".staging").glob("*")]

    def stop(self) -> None:
        self.server.stop()


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
STORES = {"directory": DirectoryStore, "s3": BucketStore}


class Cluster:
    def __init__(self, root: Path, base: Path, loras: dict[str, Path], store, replicas: list[Replica],
                 balancer: Balancer):
        self.root, self.base, self.loras, self.store = root, base, loras, store
        self.replicas, self.balancer = replicas, balancer


@pytest.fixture(scope="module", params=sorted(STORES))
def cluster(tmp_path_factory, request):
    nginx_binary()  # fails (not skips), naming the install command, when nginx is missing
    root = tmp_path_factory.mktemp("replicas")
    base = Path(save_tiny_checkpoint(root / "base", seed=0))
    started: list = []
    prefix = Path(tempfile.mkdtemp(prefix="olora-nginx-"))  # not under pytest's 0700 dir: workers drop root
    prefix.chmod(0o755)
    store = STORES[request.param](root)

    def cleanup():
        for proc in reversed(started):
            proc.stop()
        store.stop()
        shutil.rmtree(prefix, ignore_errors=True)
    request.addfinalizer(cleanup)

    replicas = []
    for i in (1, 2):
        replicas.append(Replica(f"replica{i}", base, store.replica_dir(i), root, extra_env=store.env()))
        started.append(replicas[-1])
    # Adapters are built while the replicas load (same base: the replicas only read it).
    loras = {f"ad{i}": Path(save_random_lora(base, root / f"ad{i}", r=4, seed=100 + i, task_type="CAUSAL_LM"))
             for i in range(N_ADAPTERS)}
    for replica in replicas:
        replica.wait_ready()
    balancer = Balancer(replicas, prefix)
    started.append(balancer)
    balancer.wait_ready()
    return Cluster(root, base, loras, store, replicas, balancer)


def upload(url: str, adapter_id: str, adapter_dir: Path, overwrite: bool = False) -> httpx.Response:
    return httpx.post(url + "/adapters" + ("?overwrite=true" if overwrite else ""), data={"adapter_id": adapter_id},
                      files={"archive": ("a.tgz", tar_gz(adapter_dir), "application/gzip")}, timeout=60)


def generate(url: str, prompt: str, adapter_id: str, *, header: bool = True, timeout: float = 60) -> httpx.Response:
    return httpx.post(url + "/generate", json={"inputs": prompt, "parameters": {
        "adapter_id": adapter_id, "max_new_tokens": MAX_NEW_TOKENS}},
        headers={"X-Adapter-Id": adapter_id} if header else {}, timeout=timeout)


def adapter_request_counts(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {s.labels["adapter"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "olora_adapter_requests_total"}


@pytest.fixture(scope="module")
def uploaded(cluster) -> list[str]:
    """The adapters, uploaded through the balancer (no header: round-robin, so both replicas write the store)."""
    for adapter_id, path in cluster.loras.items():
        r = upload(cluster.balancer.url, adapter_id, path)
        assert r.status_code == 201, r.text
    return list(cluster.loras)


@pytest.fixture(scope="module")
def reference(cluster, uploaded) -> dict[tuple[str, str], str]:
    """Single-replica answers: replica 1 directly, one request at a time."""
    out = {}
    for adapter_id in uploaded:
        for prompt in PROMPTS:
            r = generate(cluster.replicas[0].url, prompt, adapter_id)
            assert r.status_code == 200, r.text
            out[(prompt, adapter_id)] = r.json()["generated_text"]
    assert len(set(out.values())) > len(PROMPTS)  # adapters change the outputs: the comparisons below mean something
    return out


def add_adapter(cluster, uploaded: list[str], reference: dict) -> str:
    """One more adapter (same files as an existing one under a new id): the ring decides where it goes."""
    adapter_id = f"ad{len(uploaded)}"
    source = cluster.loras[uploaded[len(uploaded) % N_ADAPTERS]]
    cluster.loras[adapter_id] = source
    assert upload(cluster.balancer.url, adapter_id, source).status_code == 201
    for prompt in PROMPTS:
        reference[(prompt, adapter_id)] = generate(cluster.replicas[0].url, prompt, adapter_id).json()["generated_text"]
    uploaded.append(adapter_id)
    return adapter_id


def test_adapter_affinity_through_the_balancer(cluster, uploaded, reference):
    repeats = 3
    owners: dict[str, int] = {}

    def route(adapter_ids):
        before = [adapter_request_counts(r.url) for r in cluster.replicas]
        for adapter_id in adapter_ids:
            for _ in range(repeats):
                for prompt in PROMPTS:
                    r = generate(cluster.balancer.url, prompt, adapter_id)
                    assert r.status_code == 200, r.text
                    assert r.json()["generated_text"] == reference[(prompt, adapter_id)]
        after = [adapter_request_counts(r.url) for r in cluster.replicas]
        for adapter_id in adapter_ids:
            landed = [after[i].get(adapter_id, 0) - before[i].get(adapter_id, 0) for i in range(2)]
            # all of this adapter's requests went to one replica
            assert sorted(landed) == [0, repeats * len(PROMPTS)], f"{adapter_id}: requests per replica {landed}"
            owners[adapter_id] = landed.index(repeats * len(PROMPTS))

    route(list(uploaded))
    # The ring depends on the replicas' (random) ports: 8 ids all land on one replica with p = 2/2^8. Then more
    # ids are added until one lands on the other side (each does with p = 1/2), rather than failing by chance.
    for _ in range(12):
        if set(owners.values()) == {0, 1}:
            break
        route([add_adapter(cluster, uploaded, reference)])
    assert set(owners.values()) == {0, 1}, f"all adapters hashed to one replica: {owners}"
    # a header that names another adapter than the body is refused, not routed under a false adapter
    r = httpx.post(cluster.balancer.url + "/generate", json={"inputs": PROMPTS[0], "parameters": {
        "adapter_id": uploaded[1], "max_new_tokens": MAX_NEW_TOKENS}}, headers={"X-Adapter-Id": uploaded[0]},
        timeout=60)
    assert r.status_code == 400, r.text
    print("adapters per replica:", [sorted(a for a, o in owners.items() if o == i) for i in range(2)])


def test_upload_through_one_replica_is_servable_by_the_other(cluster, reference):
    r1, r2 = cluster.replicas
    r = upload(r1.url, "direct", cluster.loras["ad0"])
    assert r.status_code == 201, r.text
    served = generate(r2.url, PROMPTS[0], "direct")  # no restart, no wait: replica 2 reads the shared store
    assert served.status_code == 200, served.text
    assert served.json()["generated_text"] == reference[(PROMPTS[0], "ad0")]  # same files as ad0


def wait_until(predicate, timeout_s: float) -> float:
    """Seconds until predicate() held; fails after timeout_s."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s")


def test_delete_through_one_replica_reaches_the_other(cluster, reference):
    r1, r2 = cluster.replicas
    assert upload(r1.url, "to-delete", cluster.loras["ad1"]).status_code == 201
    assert generate(r2.url, PROMPTS[0], "to-delete").status_code == 200  # replica 2 holds it now
    assert httpx.delete(r1.url + "/adapters/to-delete", timeout=30).status_code == 200
    waited = wait_until(lambda: generate(r2.url, PROMPTS[0], "to-delete").status_code == 404, PROPAGATION_S)
    assert httpx.get(r2.url + "/adapters/to-delete").status_code == 404
    print(f"delete reached the other replica after {waited:.2f} s")


def test_overwrite_through_one_replica_reaches_the_other(cluster, reference):
    r1, r2 = cluster.replicas
    assert upload(r1.url, "to-replace", cluster.loras["ad2"]).status_code == 201
    old = generate(r2.url, PROMPTS[1], "to-replace").json()["generated_text"]  # cached on replica 2
    assert old == reference[(PROMPTS[1], "ad2")]
    r = upload(r1.url, "to-replace", cluster.loras["ad3"], overwrite=True)
    assert r.status_code == 201, r.text
    new = reference[(PROMPTS[1], "ad3")]
    assert new != old  # else the check below proves nothing
    assert generate(r1.url, PROMPTS[1], "to-replace").json()["generated_text"] == new
    waited = wait_until(lambda: generate(r2.url, PROMPTS[1], "to-replace").json()["generated_text"] == new,
                        PROPAGATION_S)
    print(f"overwrite reached the other replica after {waited:.2f} s")


def test_concurrent_uploads_of_one_id_through_both_replicas(cluster):
    r1, r2 = cluster.replicas
    sources = {r1.url: cluster.loras["ad4"], r2.url: cluster.loras["ad5"]}
    barrier = threading.Barrier(2)

    def one(url):
        barrier.wait()
        return url, upload(url, "raced", sources[url])

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = dict(pool.map(one, sources))
    statuses = sorted(r.status_code for r in results.values())
    assert statuses == [201, 409], {u: (r.status_code, r.text) for u, r in results.items()}
    loser = next(r for r in results.values() if r.status_code == 409)
    assert loser.json()["error_type"] == "adapter_exists"
    winner_url = next(u for u, r in results.items() if r.status_code == 201)
    # the store holds exactly the winner's version: complete, byte for byte
    version, versions, files = cluster.store.live("raced")
    assert versions == [version]  # the loser left no version behind
    for name in ADAPTER_FILES:
        assert files[name] == (sources[winner_url] / name).read_bytes()
    assert results[winner_url].json()["version"] == version
    assert not cluster.store.staged()  # nor anything half-written
    both = {generate(r.url, PROMPTS[0], "raced").json()["generated_text"] for r in cluster.replicas}
    assert len(both) == 1


def test_sigkill_of_a_replica_under_load(cluster, uploaded, reference):
    """Runs last in this module: it kills replica 2."""
    r1, r2 = cluster.replicas
    # replica 2 only ever got these adapters' requests through the balancer: it is their owner on the ring
    victim_adapters = [a for a in uploaded if adapter_request_counts(r2.url).get(a, 0) > 0]
    assert victim_adapters, "replica 2 owns no adapter"
    jobs = [(p, a) for a in uploaded for p in PROMPTS]
    killed_at: list[float] = []
    results = []  # (start, status or exception name, prompt, adapter, text)
    lock = threading.Lock()
    stop_at = time.monotonic() + 8.0

    def worker(offset: int):
        i = offset
        with httpx.Client(timeout=30) as http:  # a hang shows up as a timeout exception: a failure below
            while time.monotonic() < stop_at:
                prompt, adapter_id = jobs[i % len(jobs)]
                i += 3
                start = time.monotonic()
                try:
                    r = http.post(cluster.balancer.url + "/generate", json={"inputs": prompt, "parameters": {
                        "adapter_id": adapter_id, "max_new_tokens": MAX_NEW_TOKENS}},
                        headers={"X-Adapter-Id": adapter_id})
                    outcome = (start, r.status_code, prompt, adapter_id,
                               r.json().get("generated_text") if r.status_code == 200 else r.text)
                except httpx.HTTPError as exc:
                    outcome = (start, type(exc).__name__, prompt, adapter_id, str(exc))
                with lock:
                    results.append(outcome)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(worker, k) for k in range(6)]
        time.sleep(2.0)
        r2.kill()
        killed_at.append(time.monotonic())
        for f in futures:
            f.result(timeout=60)

    dead_at = killed_at[0]
    # A request in flight on the victim can lose its connection mid-response: nginx streams (proxy_buffering off,
    # for SSE), so when the replica dies between writing the headers and the body the client sees the connection
    # close. That is neither a hang nor a wrong answer, and only possible for requests started before the kill.
    # A timeout (a hang) is always a failure, and so is any client error after the kill.
    cut = ("RemoteProtocolError", "ReadError")
    errors = [o for o in results if not isinstance(o[1], int) and not (o[0] < dead_at and o[1] in cut)]
    assert not errors, f"client errors (hang, or reset after the kill): {errors[:5]}"
    results = [o for o in results if isinstance(o[1], int)]
    wrong = [o for o in results if o[1] == 200 and o[4] != reference[(o[2], o[3])]]
    assert not wrong, f"answered wrongly: {wrong[:5]}"
    before = [o for o in results if o[0] < dead_at]
    after = [o for o in results if o[0] >= dead_at]
    assert before and after
    # in flight on the victim when it died: 502 from nginx (a POST already sent is never resent); nothing else
    assert {o[1] for o in before} <= {200, 502}, {o[1] for o in before}
    # later requests all go to the survivor and are answered, the victim's adapters included
    assert {o[1] for o in after} == {200}, [o for o in after if o[1] != 200][:5]
    moved = [o for o in after if o[3] in victim_adapters]
    assert moved, "no request for the dead replica's adapters after the kill"
    survivor = adapter_request_counts(r1.url)
    assert all(survivor.get(a, 0) > 0 for a in {o[3] for o in moved})
    print(f"{len(before)} requests before the kill ({sum(o[1] == 502 for o in before)} got 502), "
          f"{len(after)} after (all 200; {len(moved)} for the dead replica's adapters)")
