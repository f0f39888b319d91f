"""Terraform for GCP: every file parses, checkov finds nothing, the module keeps Firezone's input names, and its
cloud-init template, rendered the way main.tf renders it, passes cloud-init's schema (docs/protocol.md §6.2-6.3)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import hcl2
import pytest

REPO = Path(__file__).resolve().parents[2]
TERRAFORM = REPO / "terraform"
MODULE = TERRAFORM / "modules/google-cloud/apps/gateway-region-instance-group"
EXAMPLE = TERRAFORM / "examples/google-cloud/nat-gateway"
PACKAGING = REPO / "packaging"
CHECKOV = REPO / ".venv-tools/bin/checkov"

# A template placeholder; "$${" is Terraform's escape for a literal "${".
PLACEHOLDER = re.compile(r"(?<!\$)\$\{([^}]*)\}")

FIREZONE_MODULE_INPUTS = {
    "project_id",
    "compute_network",
    "compute_subnetwork",
    "compute_region",
    "compute_instance_availability_zones",
    "compute_instance_replicas",
    "compute_instance_type",
    "compute_instance_architecture",
    "compute_provision_public_ipv4_address",
    "compute_provision_public_ipv6_address",
    "swap_size_gb",
    "queue_count",
    "observability_log_level",
    "observability_log_format",
    "observability_enable_flow_logs",
    "name",
    "labels",
    "max_unavailable_fixed",
    "max_surge_fixed",
    "token",
    "api_url",
    "artifact_url",
    "vsn",
    "additional_startup_commands",
    "health_check",
}


def load_hcl(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        parsed: dict[str, Any] = hcl2.load(handle)
    return parsed


def declared(path: Path, block: str) -> dict[str, dict[str, Any]]:
    """name → attributes of every `variable`/`output` block in one file."""
    found: dict[str, dict[str, Any]] = {}
    for entry in load_hcl(path).get(block, []):
        for name, body in entry.items():
            found[name.strip('"')] = body
    return found


def tf_files() -> list[Path]:
    return sorted(TERRAFORM.rglob("*.tf"))


def test_there_is_a_module_and_an_example() -> None:
    assert (MODULE / "main.tf").is_file()
    assert (EXAMPLE / "main.tf").is_file()
    for folder in (MODULE, EXAMPLE):
        readme = (folder / "README.md").read_text(encoding="utf-8")
        assert "```hcl" in readme, f"{folder} README has no usage block"


@pytest.mark.parametrize("path", tf_files(), ids=lambda path: str(path.relative_to(TERRAFORM)))
def test_every_tf_file_parses(path: Path) -> None:
    assert isinstance(load_hcl(path), dict)


def test_module_keeps_firezone_input_names() -> None:
    variables = declared(MODULE / "variables.tf", "variable")
    assert FIREZONE_MODULE_INPUTS <= set(variables), FIREZONE_MODULE_INPUTS - set(variables)
    assert variables["token"].get("sensitive") is True
    for name, body in variables.items():
        assert body.get("description"), f"variable {name} has no description"


def test_module_outputs_match_firezone() -> None:
    outputs = declared(MODULE / "outputs.tf", "output")
    assert set(outputs) == {"service_account", "target_tags", "instance_template", "instance_group"}


def test_example_outputs_the_static_egress_address() -> None:
    assert "static_ip_addresses" in declared(EXAMPLE / "outputs.tf", "output")


def test_module_health_check_is_http_on_healthz_8080() -> None:
    health_check = declared(MODULE / "variables.tf", "variable")["health_check"]
    type_text = str(health_check["type"])
    assert '"/healthz"' in type_text and "8080" in type_text
    main = (MODULE / "main.tf").read_text(encoding="utf-8")
    assert "http_health_check {" in main
    assert "auto_healing_policies {" in main


@pytest.mark.skipif(not CHECKOV.exists(), reason="checkov is installed by `make setup` into .venv-tools")
def test_checkov_reports_no_failed_check() -> None:
    proc = subprocess.run(
        [
            str(CHECKOV),
            "--directory",
            str(TERRAFORM),
            "--framework",
            "terraform",
            "--skip-download",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    for report in reports:
        assert report["summary"]["parsing_errors"] == 0
        failed = [(c["check_id"], c["resource"], c["file_path"]) for c in report["results"]["failed_checks"]]
        assert not failed, failed
        # A skipped check carries its reason next to it in the code (#checkov:skip=ID:reason).
        for check in report["results"]["skipped_checks"]:
            reason = check["check_result"].get("suppress_comment", "")
            assert len(reason.strip()) > 20, f"{check['check_id']} is skipped without a reason"
        assert report["summary"]["passed"] > 0
    assert proc.returncode == 0, proc.stderr[-2000:]


# --- cloud-init -------------------------------------------------------------------------------------------------------


def templatefile_arguments() -> dict[str, str]:
    """The names main.tf hands to templatefile() for cloud-init.yaml, with their expressions."""
    main = (MODULE / "main.tf").read_text(encoding="utf-8")
    call = re.search(r'templatefile\("\$\{path\.module\}/templates/cloud-init\.yaml", \{\n(.*?)\n  \}\)', main, re.S)
    assert call, "main.tf no longer renders templates/cloud-init.yaml the expected way"
    arguments = {}
    for line in call.group(1).splitlines():
        name, _, expression = line.strip().partition("=")
        arguments[name.strip()] = expression.strip()
    return arguments


def render_cloud_init(values: dict[str, Any]) -> str:
    """What templatefile() does with this template: every placeholder becomes its jsonencode()d value."""
    template = (MODULE / "templates/cloud-init.yaml").read_text(encoding="utf-8")
    rendered = PLACEHOLDER.sub(lambda match: json.dumps(values[match.group(1).strip()]), template)
    return rendered.replace("$${", "${")


def test_template_placeholders_are_exactly_the_templatefile_arguments() -> None:
    template = (MODULE / "templates/cloud-init.yaml").read_text(encoding="utf-8")
    placeholders = {name.strip() for name in PLACEHOLDER.findall(template)}
    arguments = templatefile_arguments()
    assert placeholders == set(arguments)
    # jsonencode everywhere: JSON is YAML, so no value (a token with ": " or "#", a command) can break the document.
    for name, expression in arguments.items():
        assert expression.startswith("jsonencode("), name


def test_module_ships_the_repositorys_install_script_and_unit() -> None:
    arguments = templatefile_arguments()
    assert "packaging_dir}/install-gateway.sh" in arguments["install_script_b64"]
    assert "packaging_dir}/firezone-gateway.service" in arguments["unit_b64"]
    main = (MODULE / "main.tf").read_text(encoding="utf-8")
    packaging_dir = re.search(r'packaging_dir\s*=\s*"\$\{path\.module\}/([./]+)packaging"', main)
    assert packaging_dir and (MODULE / packaging_dir.group(1) / "packaging").resolve() == PACKAGING


def test_rendered_cloud_init_passes_the_schema(tmp_path: Path) -> None:
    cloud_init = shutil.which("cloud-init")
    if cloud_init is None:
        pytest.skip("cloud-init is installed by `make setup` (Debian package)")
    values = {
        # A token with YAML-significant characters must stay one string.
        "token": 'tok: en # "quoted" <&>',
        "swap_size_bytes": 2 * 1024**3,
        "install_script_b64": base64.b64encode((PACKAGING / "install-gateway.sh").read_bytes()).decode(),
        "unit_b64": base64.b64encode((PACKAGING / "firezone-gateway.service").read_bytes()).decode(),
        "ops_agent_config": "metrics:\n  receivers: {}\n",
        "runcmd": [
            ["env", "FIREZONE_WHEEL=https://example.com/w.whl", "/usr/local/lib/firezone-gateway/install-gateway.sh"],
            ["sh", "-c", "true && true"],
            "echo additional > /run/firezone-test",
        ],
    }
    config = tmp_path / "user-data.yaml"
    config.write_text(render_cloud_init(values), encoding="utf-8")
    proc = subprocess.run(
        [cloud_init, "schema", "--config-file", str(config)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Valid cloud-config" in proc.stdout
