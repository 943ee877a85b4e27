"""One portal node vs two, through nginx, on the reference cluster (docs/cluster.md).

Starts the cluster of tests/support/cluster.py (PostgreSQL, Redis, Orthanc on PostgreSQL,
two gunicorn nodes, nginx with TLS) on 127.0.0.1, stores a small CT series through nginx
(STOW-RS), warms the render cache, then measures through nginx

* cached rendered images (one fixed ``/rendered`` URL: a Redis hit on either node), and
* QIDO-RS study searches (``/dicomweb/studies?PatientID=...``, the index in PostgreSQL),

first with both nodes up, then with node B stopped (nginx sends everything to node A), with
wrk (HTTP/1.1 keep-alive over TLS) or, when wrk is missing, a small threaded Python client.
It prints requests/s and the two-node/one-node ratio.

Everything here shares the machine: on the 2-core development machine wrk, nginx, both nodes,
PostgreSQL and Redis compete for the same two cores, so the ratio shows what a second node
costs or gains on one box, not what a second machine would add (that is close to 2x for
render-bound work as long as PostgreSQL and Redis have headroom).

Then, in the same run, ``benchmarks/audit_append.py`` (audited appends/s and p95 at 1, 4
and 16 writers, the old locked chain beside the lock-free append) and
``benchmarks/index_scale.py`` (QIDO-RS and the study list for each kind of reader at
1,000,000 studies in PostgreSQL, with its generator).

    .venv/bin/python benchmarks/cluster.py [--seconds 10] [--connections 16] [--only-nodes]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.factories import make_dataset
from tests.support.cluster import Cluster

WRK = shutil.which("wrk")


def run_wrk(url: str, headers: dict[str, str], seconds: float, connections: int) -> float:
    argv = [WRK or "wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds:g}s"]
    for key, value in headers.items():
        argv += ["-H", f"{key}: {value}"]
    done = subprocess.run([*argv, url], capture_output=True, text=True,
                          timeout=seconds + 60)
    if done.returncode:
        raise RuntimeError(f"wrk failed: {done.stdout[-500:]} {done.stderr[-500:]}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    if bad:
        raise RuntimeError(f"{bad.group(1)} failed answers from {url}")
    found = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    if not found:
        raise RuntimeError(f"no rate in wrk's output: {done.stdout[-500:]}")
    return float(found.group(1))


def run_python(url: str, headers: dict[str, str], seconds: float, connections: int,
               cafile: Path) -> float:
    """The fallback load generator: ``connections`` threads, keep-alive, over TLS."""
    host_port, path = url.split("://", 1)[1].split("/", 1)
    host, port = host_port.split(":")
    context = ssl.create_default_context(cafile=str(cafile))
    counts = [0] * connections
    stop = time.monotonic() + seconds

    def worker(index: int) -> None:
        connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
        while time.monotonic() < stop:
            connection.request("GET", "/" + path, headers=headers)
            answer = connection.getresponse()
            answer.read()
            if answer.status != 200:
                raise RuntimeError(f"{answer.status} from {url}")
            counts[index] += 1
        connection.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers per node")
    parser.add_argument("--only-nodes", action="store_true",
                        help="only one node vs two (not the audit and index benchmarks)")
    parser.add_argument("--audit-seconds", type=float, default=5.0)
    parser.add_argument("--studies", type=int, default=1_000_000,
                        help="studies in the index benchmark (its generator fills them)")
    parser.add_argument("--runs", type=int, default=10, help="runs per index case")
    parser.add_argument("--keep", metavar="FOLDER",
                        help="the index benchmark keeps its filled database here and reuses it")
    arguments = parser.parse_args()

    print(f"machine: {os.cpu_count()} cores; load generator: {'wrk' if WRK else 'Python'}; "
          f"{arguments.connections} connections, {arguments.seconds:g} s per run")
    started = time.monotonic()
    with Cluster(nodes=2, workers=arguments.workers) as cluster:
        print(f"cluster up in {time.monotonic() - started:.0f} s")
        import requests
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        session.verify = str(cluster.tls_cert)
        session.trust_env = False
        session.auth = cluster.client
        client = DICOMwebClient(url=cluster.url + "/dicomweb", session=session)
        datasets = [make_dataset(patient_id="BENCH-1", rows=512, columns=512, value=i,
                                 InstanceNumber=i + 1) for i in range(8)]
        study, series = datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID
        for ds in datasets:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        client.store_instances(datasets=datasets)
        sop = datasets[3].SOPInstanceUID
        token = base64.b64encode(":".join(cluster.client).encode()).decode()
        cases = {
            "cached rendered JPEG": (
                f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/rendered"
                "?viewport=256,256", {"Accept": "image/jpeg"}),
            "QIDO-RS study search": ("/dicomweb/studies?PatientID=BENCH-1&limit=10",
                                     {"Accept": "application/dicom+json"}),
        }
        for path, headers in cases.values():  # warm: render once, fetch copies on each node
            for node in cluster.nodes:
                answer = session.get(node.url + path, headers=headers, timeout=60)
                answer.raise_for_status()

        def measure(label: str) -> dict[str, float]:
            rates = {}
            for name, (path, headers) in cases.items():
                full = {**headers, "Authorization": f"Basic {token}"}
                if WRK:
                    rate = run_wrk(cluster.url + path, full, arguments.seconds,
                                   arguments.connections)
                else:
                    rate = run_python(cluster.url + path, full, arguments.seconds,
                                      arguments.connections, cluster.tls_cert)
                rates[name] = rate
                print(f"  {label:<10} {name:<22} {rate:9.0f} req/s")
            return rates

        two = measure("two nodes")
        cluster.stop_node(1)
        time.sleep(1)
        one = measure("one node")
        cluster.start_node(1)
    print("two nodes / one node (through nginx, same machine):")
    for name in cases:
        print(f"  {name:<22} {two[name] / one[name]:5.2f}x")
    print("Both nodes, nginx, wrk, PostgreSQL and Redis share this machine's cores: the ratio "
          "is bounded by them (see the module docstring).")
    if arguments.only_nodes:
        return
    # The other two numbers, in the same run: audited appends at 1/4/16 writers
    # (the old locked chain and the lock-free append with its sealer) and the index at
    # 1,000,000 studies for each kind of reader.
    here = Path(__file__).resolve().parent
    for script, extra in (("audit_append.py", ["--seconds", str(arguments.audit_seconds)]),
                          ("index_scale.py", ["--studies", str(arguments.studies),
                                              "--runs", str(arguments.runs),
                                              *(["--keep", arguments.keep]
                                                if arguments.keep else [])])):
        print(f"\n== {script} {' '.join(extra)}", flush=True)
        subprocess.run([sys.executable, str(here / script), *extra], check=True)


if __name__ == "__main__":
    main()
