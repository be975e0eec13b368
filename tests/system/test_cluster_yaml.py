"""cluster.yaml is a valid Ray autoscaler config (Ray's own schema validator) with what users need."""

from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


def test_cluster_yaml_validates_against_rays_schema():
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(config)  # raises jsonschema.ValidationError on a bad field
    head = config["available_node_types"][config["head_node_type"]]
    gpu = config["available_node_types"]["ray.worker.gpu"]
    assert "g6e" in gpu["node_config"]["InstanceType"] and gpu["max_workers"] >= 1
    assert "InstanceType" in head["node_config"]
    assert any("bootstrap.sh" in c for c in config["setup_commands"])
    assert "/home/ubuntu/ray_pipeline" in config["file_mounts"]
    assert all("127.0.0.1" in c for c in config["head_start_ray_commands"] if "--head" in c)


def test_schema_rejects_a_broken_config():
    pytest.importorskip("jsonschema")
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["available_node_types"]["ray.worker.gpu"]["min_workers"] = "some"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)
