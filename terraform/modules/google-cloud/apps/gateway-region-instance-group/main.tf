# A fixed-size regional managed instance group of Python Firezone Gateways, auto-healed on GET /healthz
# (docs/protocol.md §6.2 describes Firezone's module this mirrors).

locals {
  application_name = "firezone-gateway"
  # Label values allow only [a-z0-9_-].
  application_version = lower(replace(replace(var.vsn, ".", "-"), "+", "-"))
  network_tag         = "firezone-gateways-${var.name}"

  labels = merge(var.labels, {
    managed_by  = "terraform"
    application = local.application_name
    version     = local.application_version
  })

  zones = length(var.compute_instance_availability_zones) > 0 ? var.compute_instance_availability_zones : data.google_compute_zones.in_region.names

  # A regional group needs 0 or at least one instance per zone for both; Firezone's defaults.
  max_unavailable_fixed = coalesce(var.max_unavailable_fixed, max(1, length(local.zones)))
  max_surge_fixed       = coalesce(var.max_surge_fixed, max(1, var.compute_instance_replicas - 1) + length(local.zones))

  # Google's health checkers connect from these ranges.
  google_health_check_source_ranges = ["130.211.0.0/22", "35.191.0.0/16"]

  # The install script and unit are the repository's own (packaging/), shipped inside user-data so that what a VM
  # runs is pinned by this module's version, not fetched from a branch at boot.
  packaging_dir   = "${path.module}/../../../../../packaging"
  wheel_file_name = "firezone_gateway_py-${var.vsn}-py3-none-any.whl"

  install_environment = [
    "FIREZONE_WHEEL=${trimsuffix(var.artifact_url, "/")}/${local.wheel_file_name}",
    "FIREZONE_WHEEL_SHA256=${var.artifact_sha256}",
    "FIREZONE_API_URL=${var.api_url}",
    "RUST_LOG=${var.observability_log_level}",
    "FIREZONE_LOG_FORMAT=${var.observability_log_format}",
    "FIREZONE_FLOW_LOGS=${var.observability_enable_flow_logs}",
    "HEALTH_CHECK_ADDR=0.0.0.0:${var.health_check.port}",
  ]

  # Each runcmd entry given as a list runs without a shell, so no value needs quoting.
  runcmd = concat(
    [
      concat(["env"], local.install_environment, ["/usr/local/lib/firezone-gateway/install-gateway.sh"]),
      # Logs (journald through syslog) and the gateway's /metrics go to Cloud Logging and Monitoring.
      [
        "sh", "-c",
        join(" && ", [
          "curl -fsSL --proto =https -o /run/add-google-cloud-ops-agent-repo.sh https://dl.google.com/cloudagents/add-google-cloud-ops-agent-repo.sh",
          "bash /run/add-google-cloud-ops-agent-repo.sh --also-install",
          "install -m 0644 /usr/local/lib/firezone-gateway/ops-agent.yaml /etc/google-cloud-ops-agent/config.yaml",
          "systemctl restart google-cloud-ops-agent",
        ]),
      ],
    ],
    var.additional_startup_commands,
  )

  ops_agent_config = yamlencode({
    metrics = {
      receivers = {
        firezone_gateway = {
          type = "prometheus"
          config = {
            scrape_configs = [{
              job_name        = "firezone-gateway"
              scrape_interval = "60s"
              metrics_path    = "/metrics"
              static_configs  = [{ targets = ["localhost:${var.health_check.port}"] }]
            }]
          }
        }
      }
      service = {
        pipelines = {
          firezone_gateway = { receivers = ["firezone_gateway"] }
        }
      }
    }
  })

  # Every value goes into the template through jsonencode: JSON is YAML, so no value can break the document.
  cloud_init = templatefile("${path.module}/templates/cloud-init.yaml", {
    token              = jsonencode(var.token)
    swap_size_bytes    = jsonencode(var.swap_size_gb * 1024 * 1024 * 1024)
    install_script_b64 = jsonencode(filebase64("${local.packaging_dir}/install-gateway.sh"))
    unit_b64           = jsonencode(filebase64("${local.packaging_dir}/firezone-gateway.service"))
    ops_agent_config   = jsonencode(local.ops_agent_config)
    runcmd             = jsonencode(local.runcmd)
  })
}

data "google_compute_zones" "in_region" {
  project = var.project_id
  region  = var.compute_region
}

data "google_compute_image" "ubuntu" {
  project = "ubuntu-os-cloud"
  family  = "ubuntu-2404-lts-${var.compute_instance_architecture}"
}

resource "google_project_service" "compute" {
  project            = var.project_id
  service            = "compute.googleapis.com"
  disable_on_destroy = false
}

resource "google_project_service" "logging" {
  project            = var.project_id
  service            = "logging.googleapis.com"
  disable_on_destroy = false
}

resource "google_project_service" "monitoring" {
  project            = var.project_id
  service            = "monitoring.googleapis.com"
  disable_on_destroy = false
}

# The VMs' identity: they write logs and metrics, nothing else. (Firezone's module also grants Artifact Registry,
# Error Reporting, Service Management and Cloud Trace roles; nothing here uses them.)
resource "google_service_account" "application" {
  project      = var.project_id
  account_id   = "firezone-${var.name}"
  display_name = "Firezone Gateway (${var.name})"
}

resource "google_project_iam_member" "application" {
  for_each = toset([
    "roles/logging.logWriter",
    "roles/monitoring.metricWriter",
  ])

  project = var.project_id
  role    = each.key
  member  = "serviceAccount:${google_service_account.application.email}"
}

resource "google_compute_instance_template" "application" {
  #checkov:skip=CKV_GCP_36:A gateway forwards its clients' packets to resources: IP forwarding is its job.
  #checkov:skip=CKV_GCP_40:Public addresses are opt-in (compute_provision_public_ipv4/6_address); the example uses Cloud NAT instead.
  project     = var.project_id
  name_prefix = "${var.name}-"
  description = "Firezone Gateway (Python) ${var.vsn}"
  region      = var.compute_region

  machine_type   = var.compute_instance_type
  can_ip_forward = true
  tags           = [local.network_tag]
  labels         = local.labels

  scheduling {
    automatic_restart   = true
    on_host_maintenance = "MIGRATE"
    provisioning_model  = "STANDARD"
  }

  disk {
    source_image = data.google_compute_image.ubuntu.self_link
    auto_delete  = true
    boot         = true
    disk_type    = "pd-balanced"
    disk_size_gb = 20
    labels       = local.labels
  }

  network_interface {
    subnetwork  = var.compute_subnetwork
    stack_type  = "IPV4_IPV6"
    nic_type    = "GVNIC"
    queue_count = var.queue_count

    dynamic "access_config" {
      for_each = var.compute_provision_public_ipv4_address ? [true] : []
      content {
        network_tier = "PREMIUM"
      }
    }

    dynamic "ipv6_access_config" {
      for_each = var.compute_provision_public_ipv6_address ? [true] : []
      content {
        network_tier = "PREMIUM"
      }
    }
  }

  service_account {
    email = google_service_account.application.email
    scopes = [
      "https://www.googleapis.com/auth/logging.write",
      "https://www.googleapis.com/auth/monitoring.write",
    ]
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  metadata = {
    user-data              = local.cloud_init
    block-project-ssh-keys = "true"
    serial-port-enable     = "false"
    enable-oslogin         = "TRUE"
    google-logging-enabled = "true"
  }

  lifecycle {
    create_before_destroy = true
  }

  depends_on = [google_project_service.compute]
}

resource "google_compute_health_check" "port" {
  project = var.project_id
  name    = "${var.name}-${var.health_check.name}"

  check_interval_sec  = var.health_check.check_interval_sec
  timeout_sec         = var.health_check.timeout_sec
  healthy_threshold   = var.health_check.healthy_threshold
  unhealthy_threshold = var.health_check.unhealthy_threshold

  # Always HTTP on the gateway's health server, whatever health_check.protocol says: a TCP connect alone would pass
  # while the process hangs.
  http_health_check {
    port         = var.health_check.port
    request_path = var.health_check.http_health_check.request_path
  }

  log_config {
    enable = false
  }

  depends_on = [google_project_service.compute]
}

resource "google_compute_region_instance_group_manager" "application" {
  project            = var.project_id
  name               = "${var.name}-${var.compute_region}"
  description        = "Firezone Gateways (Python)"
  base_instance_name = var.name
  region             = var.compute_region

  distribution_policy_zones = local.zones
  target_size               = var.compute_instance_replicas

  wait_for_instances        = true
  wait_for_instances_status = "STABLE"

  version {
    name              = local.application_version
    instance_template = google_compute_instance_template.application.self_link
  }

  named_port {
    name = "health"
    port = var.health_check.port
  }

  auto_healing_policies {
    health_check      = google_compute_health_check.port.self_link
    initial_delay_sec = var.health_check.initial_delay_sec
  }

  update_policy {
    type                  = "PROACTIVE"
    minimal_action        = "REPLACE"
    replacement_method    = "SUBSTITUTE"
    max_unavailable_fixed = local.max_unavailable_fixed
    max_surge_fixed       = local.max_surge_fixed
  }

  timeouts {
    create = "30m"
    update = "30m"
    delete = "20m"
  }

  depends_on = [google_project_iam_member.application]
}

resource "google_compute_firewall" "health_checks" {
  project   = var.project_id
  name      = "${var.name}-health-checks"
  network   = var.compute_network
  direction = "INGRESS"

  source_ranges = local.google_health_check_source_ranges
  target_tags   = [local.network_tag]

  allow {
    protocol = lower(var.health_check.protocol)
    ports    = [tostring(var.health_check.port)]
  }
}
