"""A bounded load test of ``multitask-nnunet serve`` on loopback: N concurrent clients, M requests each.

Either starts a server itself (``-m MODEL_DIR``: ``multitask-nnunet serve`` on a free 127.0.0.1 port, with a queue
large enough for every client, so that no request is turned away) or targets a running one (``--url``; with
``--pid`` its memory is read too). Every request uploads one case (cycling through the NIfTI files of
``-i INPUT_DIR``, nnU-Net channel naming, one channel) to ``POST /predict`` and fetches its mask; a request
counts as an error unless both answer 200.

Prints: requests, errors (must be 0), latency p50/p95/max of the whole request (upload, queueing, prediction,
answer; the mask download separately), throughput (requests per second over the wall time), and the server's
resident memory (VmRSS of its process, Linux) before the first request, after a warm-up round of one request
per client, and after the last: the growth after the warm-up must not scale with the number of requests (the
results store keeps at most ``--max-results`` masks and viewer volumes). ``--rounds R`` runs the N x M load R
times and prints the memory after each round, which is what shows growth without bound.

Usage: python benchmarks/serve_load.py -m MODEL_DIR -i INPUT_DIR [-n 4] [-r 5] [--rounds 2] [--device cpu]
       python benchmarks/serve_load.py --url http://127.0.0.1:8000 -i INPUT_DIR [--pid PID] [--token T]
"""
import argparse
import glob
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests


def rss_mib(pid):
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args):
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="serve_load_", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "multitask_nnunet.cli", "serve", "-m", args.m, "--port", str(port),
           "--queue-size", str(max(4, args.clients)), "--max-results", str(args.max_results)]
    if args.device:
        cmd += ["--device", args.device]
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"serve exited {process.returncode}; see {log.name}")
        try:
            if requests.get(f"{url}/health", timeout=5).ok:
                return url, process, log.name
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    process.kill()
    sys.exit(f"serve did not start within 600 s; see {log.name}")


def one_request(url, file, headers):
    t0 = time.perf_counter()
    with open(file, "rb") as f:
        response = requests.post(f"{url}/predict", files={"files": (os.path.basename(file), f)}, headers=headers,
                                 timeout=600)
    t1 = time.perf_counter()
    if response.status_code != 200:
        return t1 - t0, None, f"predict {response.status_code}: {response.text[:200]}"
    mask = requests.get(f"{url}/predict/{response.json()['id']}/mask", headers=headers, timeout=600)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, None if mask.status_code == 200 else f"mask {mask.status_code}: {mask.text[:200]}"


def load(url, files, clients, per_client, headers):
    """clients x per_client requests; each client sends its requests one after the other."""
    def client(c):
        return [one_request(url, files[(c * per_client + r) % len(files)], headers) for r in range(per_client)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    return results, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", help="model folder: start a server on a free loopback port")
    parser.add_argument("--url", help="instead of -m: a running server (loopback)")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, for its memory")
    parser.add_argument("--token", default=os.environ.get("MULTITASK_NNUNET_TOKEN"))
    parser.add_argument("-i", required=True, help="folder of one-channel NIfTI cases (<case>_0000.nii.gz)")
    parser.add_argument("-n", "--clients", type=int, default=4)
    parser.add_argument("-r", "--requests", type=int, default=5, help="requests per client per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", choices=["cuda", "cpu"])
    parser.add_argument("--max-results", type=int, default=8, help="with -m: the server's --max-results")
    args = parser.parse_args()
    if bool(args.m) == bool(args.url):
        parser.error("give -m MODEL_DIR or --url URL")
    if args.clients * args.requests * args.rounds > 2000:
        parser.error("bounded load test: at most 2000 requests in all")
    files = sorted(glob.glob(os.path.join(args.i, "*_0000.nii*")))
    if not files:
        parser.error(f"{args.i}: no <case>_0000.nii(.gz) files")
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    process = None
    if args.m:
        url, process, log = start(args)
        pid = process.pid
        print(f"server: {url} (pid {pid}, log {log})")
    else:
        url, pid = args.url.rstrip("/"), args.pid
    try:
        model = requests.get(f"{url}/model", headers=headers, timeout=30).json()
        print(f"model: {model['plans']['name']} {model['plans']['configuration']}, folds {model['folds']}, "
              f"device {model['device']}, torch {model['version']['torch']}, nnunetv2 {model['version']['nnunetv2']}")
        memory = [("start", rss_mib(pid))]
        load(url, files, args.clients, 1, headers)  # warm-up round, one request per client
        memory.append(("after warm-up", rss_mib(pid)))
        all_results, wall = [], 0.0
        for round_ in range(args.rounds):
            results, seconds = load(url, files, args.clients, args.requests, headers)
            all_results += results
            wall += seconds
            memory.append((f"after round {round_ + 1}", rss_mib(pid)))
        latency = np.array([r[0] for r in all_results])
        masks = np.array([r[1] for r in all_results if r[1] is not None])
        errors = [r[2] for r in all_results if r[2]]
        print(f"{args.clients} clients x {args.requests} requests x {args.rounds} rounds = {len(all_results)} "
              f"requests in {wall:.1f} s: throughput {len(all_results) / wall:.2f} requests/s")
        print(f"latency (POST /predict) p50 {np.percentile(latency, 50):.3f} s, p95 {np.percentile(latency, 95):.3f}"
              f" s, max {latency.max():.3f} s; mask download p50 "
              f"{np.percentile(masks, 50) if len(masks) else float('nan'):.3f} s")
        print(f"errors: {len(errors)}" + "".join(f"\n  {e}" for e in errors[:10]))
        print("server memory (VmRSS): " + ", ".join(
            f"{label} {value:.0f} MiB" if value is not None else f"{label} ?" for label, value in memory))
        return 1 if errors else 0
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)


if __name__ == "__main__":
    sys.exit(main())
