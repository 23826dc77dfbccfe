"""cluster/: the launcher config validates against Ray's own autoscaler schema; the KubeRay manifests
against a compact subset of the RayCluster / RayJob CRDs (ray.io/v1: required fields, types, no
unknown fields); every ``lme-sim`` and ``ray start`` command in them and in cluster/README.md
parses with the real command lines; versions agree with the project's Ray pin."""

import copy
import re
import shlex
from pathlib import Path

import click
import jsonschema
import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"

_STR = {"type": "string"}
_STR_MAP = {"type": "object", "additionalProperties": _STR}
_QUANTITIES = {"type": "object", "additionalProperties": {"type": ["string", "integer"]}}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": _STR,
        "image": _STR,
        "imagePullPolicy": _STR,
        "command": {"type": "array", "items": _STR},
        "args": {"type": "array", "items": _STR},
        "env": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {"name": _STR, "value": _STR, "valueFrom": {"type": "object"}},
            },
        },
        "ports": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["containerPort"],
                "properties": {"containerPort": {"type": "integer"}, "name": _STR},
            },
        },
        "resources": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"limits": _QUANTITIES, "requests": _QUANTITIES},
        },
        "volumeMounts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "mountPath"],
                "properties": {
                    "name": _STR,
                    "mountPath": _STR,
                    "subPath": _STR,
                    "readOnly": {"type": "boolean"},
                },
            },
        },
    },
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
            },
        },
    },
}
_RAY_START_PARAMS = _STR_MAP  # KubeRay passes them as `ray start --key=value`: values are strings
_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "rayVersion": _STR,
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object"},
        "headGroupSpec": {
            "type": "object",
            "required": ["rayStartParams", "template"],
            "additionalProperties": False,
            "properties": {
                "rayStartParams": _RAY_START_PARAMS,
                "serviceType": _STR,
                "enableIngress": {"type": "boolean"},
                "template": _POD_TEMPLATE,
            },
        },
        "workerGroupSpecs": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
                "properties": {
                    "groupName": _STR,
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 0},
                    "rayStartParams": _RAY_START_PARAMS,
                    "template": _POD_TEMPLATE,
                },
            },
        },
    },
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
}
KUBERAY = {
    "RayCluster": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": "RayCluster"},
            "metadata": _METADATA,
            "spec": _CLUSTER_SPEC,
        },
    },
    "RayJob": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": "RayJob"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["entrypoint"],
                "additionalProperties": False,
                "oneOf": [{"required": ["rayClusterSpec"]}, {"required": ["clusterSelector"]}],
                "properties": {
                    "entrypoint": _STR,
                    "runtimeEnvYAML": _STR,
                    "jobId": _STR,
                    "metadata": _STR_MAP,
                    "clusterSelector": _STR_MAP,
                    "rayClusterSpec": _CLUSTER_SPEC,
                    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
                    "shutdownAfterJobFinishes": {"type": "boolean"},
                    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                    "activeDeadlineSeconds": {"type": "integer", "minimum": 0},
                    "backoffLimit": {"type": "integer", "minimum": 0},
                    "entrypointNumCpus": {"type": "number"},
                    "entrypointNumGpus": {"type": "number"},
                    "entrypointResources": _STR,
                    "suspend": {"type": "boolean"},
                    "submitterPodTemplate": _POD_TEMPLATE,
                },
            },
        },
    },
    "PersistentVolumeClaim": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "v1"},
            "metadata": _METADATA,
            "spec": {"type": "object", "required": ["accessModes", "resources"]},
        },
    },
}


def _ray_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in deps if d.startswith("ray=="))


def _manifests():
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            yield path.name, doc


def _commands(text: str, program: str) -> list[list[str]]:
    """The arguments of every ``program ...`` command in a shell text: commands end at new lines,
    ``&&``, ``;`` and pipes, and are looked for at the start, after ``--`` (``ray job submit --
    ...``) and inside ``bash -c "..."``."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        segments = [[]]
        for w in lexer:
            if set(w) <= set(";&|"):
                segments.append([])
            else:
                segments[-1].append(w)
        for seg in segments:
            if seg[:2] == ["bash", "-c"] and len(seg) > 2:
                found += _commands(seg[2], program)
            elif seg[:1] == [program]:
                found.append(seg[1:])
            elif "--" in seg:
                found += _commands(shlex.join(seg[seg.index("--") + 1 :]), program)
    return found


def _check_cli(cmd: click.Command, argv: list[str], where: str) -> None:
    """Parse ``argv`` with the real click command: unknown commands and options fail."""
    args = list(argv)
    try:
        while isinstance(cmd, click.Group):
            sub = cmd.get_command(click.Context(cmd), args[0]) if args else None
            if sub is None:
                raise click.UsageError(f"no such command {args[:1]}")
            cmd, args = sub, args[1:]
        cmd.make_context(cmd.name, args)
    except click.UsageError as e:
        raise AssertionError(f"{where}: `{' '.join(argv)}`: {e}") from None


def _lme_sim(argv: list[str], where: str) -> None:
    from lme_sim.cli import main

    _check_cli(main, argv, where)


def _ray_start(argv: list[str], where: str) -> None:
    """A ``ray start ...`` command parses with Ray's own command line (shell variables dropped)."""
    from ray.scripts.scripts import cli

    assert argv[:1] == ["start"], f"{where}: {argv}"
    _check_cli(cli, [a for a in argv if "$" not in a], where)


def _shell_texts(obj):
    """The RayJob entrypoint and containers' command/args, anywhere in a manifest."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "entrypoint":
                yield v
            elif k in ("command", "args"):
                yield shlex.join(v)
            else:
                yield from _shell_texts(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _shell_texts(v)


def test_launcher_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "ray-cluster.aws.yaml").read_text())
    for field in ("cluster_name", "provider", "max_workers", "available_node_types", "head_node_type"):
        assert field in config, field
    validate_config(
        prepare_config(copy.deepcopy(config))
    )  # Ray's schema (ray-schema.json) and its own checks
    gpus = sum(
        t.get("min_workers", 0) * t["resources"].get("GPU", 0)
        for t in config["available_node_types"].values()
    )
    scn = yaml.safe_load((ROOT / "scenarios/counterfact-2000x100-llama3-8b.yaml").read_text())
    assert (
        gpus == scn["runtime"]["shards"] + scn["runtime"]["evaluators"]
    )  # 2 shards + 1 evaluator, a GPU each
    assert config["docker"]["image"].startswith(f"rayproject/ray:{_ray_pin()}-")
    bad = copy.deepcopy(config)
    bad["available_node_types"]["head"]["node_confg"] = bad["available_node_types"]["head"].pop("node_config")
    with pytest.raises(Exception, match="node_config"):
        validate_config(prepare_config(bad))
    starts = [
        argv
        for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
        for argv in _commands(cmd, "ray")
        if argv[:1] == ["start"]
    ]
    assert len(starts) == 2
    for argv in starts:
        _ray_start(argv, "ray-cluster.aws.yaml")
    assert (ROOT / "cluster/install.sh").is_file()
    assert "cluster/install.sh" in " ".join(config["setup_commands"])


def test_kuberay_manifests_validate_against_the_crd_subset():
    kinds = []
    for name, doc in _manifests():
        jsonschema.validate(doc, KUBERAY[doc["kind"]])
        kinds.append(doc["kind"])
        if doc["kind"] == "RayCluster":
            spec = doc["spec"]
            assert spec["rayVersion"] == _ray_pin()
            groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
            for group in groups:
                start = [f"--{k}={v}" for k, v in group["rayStartParams"].items()]
                _ray_start(["start", *start], f"{name} rayStartParams")
                for c in group["template"]["spec"]["containers"]:
                    assert {"name": "LME_SIM_CACHE", "value": "/shared/lme-cache"} in c["env"], name
                    assert {"name": "shared", "mountPath": "/shared"} in c["volumeMounts"], name
            gpus = sum(
                g["replicas"]
                * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
                for g in spec["workerGroupSpecs"]
            )
            assert gpus == 3
    assert sorted(kinds) == ["PersistentVolumeClaim", "RayCluster", "RayJob"]


def test_crd_subset_rejects_what_kuberay_would():
    ((_, cluster),) = [(n, d) for n, d in _manifests() if d["kind"] == "RayCluster"]
    ((_, job),) = [(n, d) for n, d in _manifests() if d["kind"] == "RayJob"]
    broken = []
    c = copy.deepcopy(cluster)
    c["apiVersion"] = "ray.io/v1alpha1"
    broken.append((c, "RayCluster"))
    c = copy.deepcopy(cluster)
    c["spec"]["workerGroupSpecs"][0]["rayStartParams"] = {"num-gpus": 1}  # must be a string
    broken.append((c, "RayCluster"))
    c = copy.deepcopy(cluster)
    c["spec"]["headGroupSpec"]["templates"] = c["spec"]["headGroupSpec"].pop("template")
    broken.append((c, "RayCluster"))
    j = copy.deepcopy(job)
    j["spec"]["rayClusterSpec"] = cluster["spec"]  # both a selector and a spec
    broken.append((j, "RayJob"))
    j = copy.deepcopy(job)
    del j["spec"]["entrypoint"]
    broken.append((j, "RayJob"))
    for doc, kind in broken:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, KUBERAY[kind])


def test_commands_in_manifests_and_readme_are_real():
    seen = []
    for name, doc in _manifests():
        for text in _shell_texts(doc):
            for argv in _commands(text, "lme-sim"):
                _lme_sim(argv, name)
                seen.append(argv)
    readme = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    for block in blocks:
        for argv in _commands(block, "lme-sim"):
            _lme_sim(argv, "cluster/README.md")
            seen.append(argv)
        for argv in _commands(block, "ray"):
            if argv[:1] == ["start"]:
                _ray_start(argv, "cluster/README.md")
    assert [
        "run",
        "scenarios/counterfact-2000x100-llama3-8b.yaml",
        "--db",
        "/shared/runs/counterfact-llama3-8b.duckdb",
    ] in seen
    assert any(a[:1] == ["run"] and "--address" in a for a in seen)  # the --address path is documented
    for argv in seen:  # scenario files named by the commands exist and are valid scenario documents
        for arg in argv:
            if arg.startswith("scenarios/") and arg.endswith(".yaml"):
                from lme_sim.scenario import Scenario

                Scenario(**yaml.safe_load((ROOT / arg).read_text()))


def test_bad_cli_flags_are_caught():
    with pytest.raises(AssertionError, match="No such option"):
        _lme_sim(["run", "x.yaml", "--adress", "auto"], "here")
    with pytest.raises(AssertionError, match="No such option"):
        _ray_start(["start", "--head", "--gpus=1"], "here")


INSTANCE = re.compile(r"\b([a-z]\d[a-z0-9]*\.(?:\d*x)?large)\b")  # AWS instance types: g6e.4xlarge, m5.large


def _instance_table() -> dict[str, dict[str, str]]:
    """cluster/README.md's table of instance types: ``{type: {column: value}}``."""
    lines = (CLUSTER / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| instance type |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    table = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        row = dict(zip(header, (c.strip().strip("`") for c in line.strip("|").split("|"))))
        table[row["instance type"]] = row
    return table


def _sizing() -> tuple[float, float]:
    """From cluster/README.md's sizing table: shard 0's peak GPU memory, the vLLM evaluator's weights (GB)."""
    readme = (CLUSTER / "README.md").read_text()
    shard0 = next(line for line in readme.splitlines() if line.startswith("| shard 0 "))
    evaluator = next(line for line in readme.splitlines() if line.startswith("| vLLM evaluator "))
    return (
        float(re.search(r"~(\d+(?:\.\d+)?) GB at peak", shard0).group(1)),
        float(re.search(r"weights (\d+(?:\.\d+)?) GB", evaluator).group(1)),
    )


def test_gpu_instance_types_hold_the_sizing():
    """Every instance type the cluster files name is in README's table; each GPU worker type of the
    launcher config holds shard 0's peak and the vLLM evaluator's weights at its memory share, and
    its comment names the table's GPU."""
    table = _instance_table()
    named = {m for f in sorted(CLUSTER.rglob("*")) if f.is_file() for m in INSTANCE.findall(f.read_text())}
    named |= set(INSTANCE.findall((ROOT / "docs/evaluators.md").read_text()))
    assert named and named <= set(table), f"not in cluster/README.md's instance table: {named - set(table)}"
    peak, weights = _sizing()
    scn = yaml.safe_load((ROOT / "scenarios/counterfact-2000x100-llama3-8b.yaml").read_text())
    share = scn["evaluator"]["gpu_memory_utilization"]
    text = (CLUSTER / "ray-cluster.aws.yaml").read_text()
    config = yaml.safe_load(text)
    workers = [t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    assert workers
    for t in workers:
        kind = t["node_config"]["InstanceType"]
        gb = float(table[kind]["GPU memory (GB)"])
        assert gb >= peak, f"{kind}: {gb:g} GB GPU, shard 0 needs ~{peak:g} GB at peak (cluster/README.md)"
        assert gb * share > weights, f"{kind}: {share} of {gb:g} GB cannot hold {weights:g} GB of weights"
        gpu = table[kind]["GPU"].split()[-1]  # e.g. L40S
        line = next(line for line in text.splitlines() if f"InstanceType: {kind}" in line)
        assert gpu in line, f"ray-cluster.aws.yaml: the comment of {kind} should name its GPU ({gpu}): {line}"
    head = config["available_node_types"][config["head_node_type"]]["node_config"]["InstanceType"]
    assert table[head]["GPU memory (GB)"] == "0"


def test_one_vllm_version_everywhere():
    """install.sh, the Makefile's CPU build and the docs install the same vLLM; no install of an
    unpinned vLLM is documented."""
    files = [
        CLUSTER / "install.sh",
        CLUSTER / "Dockerfile",
        CLUSTER / "README.md",
        ROOT / "Makefile",
        ROOT / "docs/evaluators.md",
        ROOT / "README.md",
    ]
    pins, unpinned = set(), []
    for f in files:
        for line in f.read_text().splitlines():
            if "pip install" not in line:
                continue
            for token in re.split(r"[\s'\"`;]+", line.split("#")[0]):
                if re.fullmatch(r"vllm(-cpu)?==[\w.]+", token):
                    pins.add(token.split("==")[1])
                elif re.fullmatch(r"vllm(-cpu)?", token):
                    unpinned.append(f"{f.relative_to(ROOT)}: {line.strip()}")
    assert not unpinned, unpinned
    assert len(pins) == 1, pins
