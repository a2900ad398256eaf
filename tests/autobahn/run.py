"""Run the Autobahn|Testsuite fuzzing client against uvworker's WebSocket echo (issue 3).

Not part of the default pytest run: the full set of cases takes a few minutes.

    python tests/autobahn/run.py                 # cases 1-10 on both parsers
    python tests/autobahn/run.py --http h11 --cases '6.*' '7.*'
    python tests/autobahn/run.py --all           # also 12.* and 13.* (permessage-deflate; slow)

Autobahn|Testsuite (PyPI ``autobahntestsuite``) runs only under Python 2.7. The script looks for
an interpreter in ``$AUTOBAHN_PYTHON2``, then ``python2.7`` / ``python2`` on PATH, then pyenv's
``~/.pyenv/versions/2.7*``. Without one it says so and exits with status 0 (skipped), unless
``--require`` is given. The suite is installed with that interpreter's pip into
``~/.cache/uvworker-autobahn/py27`` (its own prefix: the interpreter's site-packages are left
alone), once.

For each parser it starts ``uvworker tests.autobahn.echo:app`` on a free 127.0.0.1 port, runs
``wstest -m fuzzingclient`` with ``fuzzingclient.json`` (cases, options), reads the report and
prints a summary per behaviour. The exit status is 1 when any case FAILED or was UNIMPLEMENTED,
or the server died. HTML reports are kept under ``--outdir`` (default: ``uvworker-autobahn``
in the system's temporary directory).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PREFIX = Path.home() / ".cache" / "uvworker-autobahn" / "py27"
GOOD = {"OK", "NON-STRICT", "INFORMATIONAL"}
# Run wstest with the prefix as a site dir (so the zope namespace .pth files are processed).
WSTEST = (
    "import site, sys; site.addsitedir(sys.argv[1]); sys.argv = ['wstest'] + sys.argv[2:]; "
    "from autobahntestsuite.wstest import run; run()"
)


def find_python2() -> str | None:
    candidates = [os.environ.get("AUTOBAHN_PYTHON2", "")]
    candidates += [shutil.which(name) or "" for name in ("python2.7", "python2")]
    candidates += sorted(glob.glob(str(Path.home() / ".pyenv" / "versions" / "2.7*" / "bin" / "python")), reverse=True)
    for candidate in candidates:
        if not candidate:
            continue
        try:
            out = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (2, 7))"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.stdout.strip() == "True":
            return candidate
    return None


def site_packages(python2: str) -> str:
    return str(PREFIX / "lib" / "python2.7" / "site-packages")


def ensure_installed(python2: str) -> None:
    check = [python2, "-c", WSTEST, site_packages(python2), "--autobahnversion"]
    if subprocess.run(check, capture_output=True).returncode == 0:
        return
    print(f"installing autobahntestsuite for {python2} into {PREFIX} ...", flush=True)
    # --ignore-installed: without it pip "upgrades" setuptools by uninstalling the interpreter's own.
    subprocess.run([python2, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--ignore-installed", "--prefix", str(PREFIX), "autobahntestsuite"], check=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"uvworker exited with status {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"uvworker did not listen on port {port} within {timeout} s")


def run_one(python2: str, http: str, cases: list[str], outdir: Path) -> collections.Counter[str]:
    port = free_port()
    agent = f"uvworker-{http}"
    server = subprocess.Popen(
        [sys.executable, "-m", "uvworker", "tests.autobahn.echo:app", "--port", str(port), "--http", http,
         "--no-access-log", "--log-level", "warning", "--ws-ping-interval", "0"],
        cwd=ROOT,
    )
    try:
        wait_listening(port, server)
        spec = json.loads((HERE / "fuzzingclient.json").read_text())
        spec["outdir"] = str(outdir)
        spec["servers"] = [{"agent": agent, "url": f"ws://127.0.0.1:{port}"}]
        if cases:
            spec["cases"] = cases
        spec_path = outdir / f"spec-{http}.json"
        outdir.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(spec, indent=2))
        subprocess.run([python2, "-c", WSTEST, site_packages(python2), "-m", "fuzzingclient", "-s", str(spec_path)],
                       cwd=outdir, check=True, stdout=subprocess.DEVNULL)
        if server.poll() is not None:
            raise SystemExit(f"uvworker died during the run (status {server.returncode})")
    finally:
        server.terminate()
        server.wait(timeout=30)
    report = json.loads((outdir / "index.json").read_text())[agent]
    counts: collections.Counter[str] = collections.Counter()
    bad = []
    for case, result in sorted(report.items(), key=lambda item: [int(p) for p in item[0].split(".")]):
        for key in ("behavior", "behaviorClose"):
            if result[key] not in GOOD:
                bad.append(f"{case} {key}={result[key]}")
        counts[result["behavior"]] += 1
    summary = ", ".join(f"{count} {behavior}" for behavior, count in sorted(counts.items()))
    print(f"{agent}: {sum(counts.values())} cases: {summary}")
    for line in bad:
        print(f"  not OK: {line}")
    counts["_bad"] = len(bad)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--http", choices=("httptools", "h11", "both"), default="both")
    parser.add_argument("--cases", nargs="*", default=[], help="case patterns, e.g. '6.*' (default: the spec's)")
    parser.add_argument("--all", action="store_true", help="also the permessage-deflate cases 12.* and 13.*")
    parser.add_argument("--outdir", type=Path, default=Path(tempfile.gettempdir()) / "uvworker-autobahn")
    parser.add_argument("--require", action="store_true", help="fail (status 2) when no Python 2.7 is found")
    args = parser.parse_args(argv)

    python2 = find_python2()
    if python2 is None:
        print("SKIPPED: Autobahn|Testsuite needs a Python 2.7 interpreter and none was found "
              "($AUTOBAHN_PYTHON2, python2.7 on PATH, ~/.pyenv/versions/2.7*).")
        return 2 if args.require else 0
    ensure_installed(python2)
    cases = list(args.cases)
    if args.all:
        cases = (cases or json.loads((HERE / "fuzzingclient.json").read_text())["cases"]) + ["12.*", "13.*"]
    failed = 0
    for http in ("httptools", "h11") if args.http == "both" else (args.http,):
        counts = run_one(python2, http, cases, args.outdir / http)
        failed += counts["_bad"]
    print(f"reports: {args.outdir}/<parser>/index.html")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
