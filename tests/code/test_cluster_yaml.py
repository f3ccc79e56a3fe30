"""cluster.yaml is a valid Ray cluster-launcher config, with a CPU head and autoscaling GPU workers."""

import json
from pathlib import Path

import jsonschema
import ray
import yaml

from helpers import ROOT


def test_cluster_yaml_matches_the_schema_shipped_with_ray():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    head = config["available_node_types"][config["head_node_type"]]
    gpu_workers = [t for name, t in config["available_node_types"].items()
                   if name != config["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert head["resources"]["GPU"] == 0 and gpu_workers
    assert all(t["max_workers"] > t["min_workers"] for t in gpu_workers)  # autoscaling
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}") and "-gpu" in config["docker"]["image"]
    assert any("pip install" in c and "boneage" in c for c in config["setup_commands"])


def test_cluster_yaml_exposes_no_ray_port_beyond_the_head():
    """The dashboard (job API) listens on loopback only, and the security group opens none of Ray's or Serve's
    ports: users reach them through SSH (`ray dashboard`, `ray attach --port-forward`)."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    opened = config["provider"]["security_group"]["IpPermissions"]
    assert not [rule for rule in opened if rule.get("FromPort", 0) <= 10001 and rule.get("ToPort", 65535) >= 6379]
    serve = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    assert serve["http_options"]["host"] == "127.0.0.1"
