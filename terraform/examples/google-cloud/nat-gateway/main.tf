resource "google_project_service" "compute" {
  project            = var.project_id
  service            = "compute.googleapis.com"
  disable_on_destroy = false
}

module "gateways" {
  source = "../../../modules/google-cloud/apps/gateway-region-instance-group"

  project_id = var.project_id

  compute_network    = google_compute_network.firezone.self_link
  compute_subnetwork = google_compute_subnetwork.firezone.self_link
  compute_region     = var.region

  compute_instance_replicas = var.replicas
  compute_instance_type     = var.machine_type

  # No public addresses: egress goes through Cloud NAT's static address.
  compute_provision_public_ipv4_address = false
  compute_provision_public_ipv6_address = false

  vsn             = var.vsn
  artifact_url    = var.artifact_url
  artifact_sha256 = var.artifact_sha256

  observability_log_level        = var.log_level
  observability_enable_flow_logs = var.enable_flow_logs

  additional_startup_commands = var.additional_startup_commands

  token = var.token

  depends_on = [google_compute_router_nat.firezone]
}
