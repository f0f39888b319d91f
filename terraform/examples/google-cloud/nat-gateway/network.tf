# A dual-stack VPC whose gateways have no public address: all their egress leaves through Cloud NAT from one static
# IPv4 address, which is what resources allowlist (docs/protocol.md §6.3).

resource "google_compute_network" "firezone" {
  project                  = var.project_id
  name                     = "firezone-gateway"
  auto_create_subnetworks  = false
  enable_ula_internal_ipv6 = true

  depends_on = [google_project_service.compute]
}

resource "google_compute_subnetwork" "firezone" {
  #checkov:skip=CKV_GCP_26:VPC flow logs cost money per GB of traffic a gateway forwards; enable them if your audit needs them.
  project = var.project_id
  name    = "firezone-gateways"
  region  = var.region
  network = google_compute_network.firezone.id

  stack_type       = "IPV4_IPV6"
  ip_cidr_range    = var.subnet_cidr
  ipv6_access_type = "INTERNAL"

  private_ip_google_access   = true
  private_ipv6_google_access = "ENABLE_OUTBOUND_VM_ACCESS_TO_GOOGLE"
}

resource "google_compute_address" "nat_ipv4" {
  project      = var.project_id
  name         = "firezone-gateway-nat-ipv4"
  region       = var.region
  address_type = "EXTERNAL"
  network_tier = "PREMIUM"
}

resource "google_compute_router" "firezone" {
  project = var.project_id
  name    = "firezone-gateway-router"
  region  = var.region
  network = google_compute_network.firezone.id
}

resource "google_compute_router_nat" "firezone" {
  project = var.project_id
  name    = "firezone-gateway-nat"
  region  = var.region
  router  = google_compute_router.firezone.name

  nat_ip_allocate_option = "MANUAL_ONLY"
  nat_ips                = [google_compute_address.nat_ipv4.self_link]

  source_subnetwork_ip_ranges_to_nat = "LIST_OF_SUBNETWORKS"
  subnetwork {
    name                    = google_compute_subnetwork.firezone.id
    source_ip_ranges_to_nat = ["ALL_IP_RANGES"]
  }

  # Each client flow to one public resource takes a NAT port: a static 64 ports per VM would cap a gateway at 64
  # clients per destination, so ports are allocated on demand up to 32768.
  enable_dynamic_port_allocation      = true
  enable_endpoint_independent_mapping = false
  min_ports_per_vm                    = 64
  max_ports_per_vm                    = 32768

  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }
}

# Gateways reach the portal, relays, clients and resources anywhere.
resource "google_compute_firewall" "egress_ipv4" {
  project   = var.project_id
  name      = "firezone-gateways-egress-ipv4"
  network   = google_compute_network.firezone.id
  direction = "EGRESS"

  target_tags        = module.gateways.target_tags
  destination_ranges = ["0.0.0.0/0"]

  allow {
    protocol = "all"
  }
}

resource "google_compute_firewall" "egress_ipv6" {
  project   = var.project_id
  name      = "firezone-gateways-egress-ipv6"
  network   = google_compute_network.firezone.id
  direction = "EGRESS"

  target_tags        = module.gateways.target_tags
  destination_ranges = ["::/0"]

  allow {
    protocol = "all"
  }
}

# SSH only through Identity-Aware Proxy (gcloud compute ssh --tunnel-through-iap).
resource "google_compute_firewall" "ssh_from_iap" {
  project   = var.project_id
  name      = "firezone-gateways-ssh-from-iap"
  network   = google_compute_network.firezone.id
  direction = "INGRESS"

  source_ranges = ["35.235.240.0/20"]
  target_tags   = module.gateways.target_tags

  allow {
    protocol = "tcp"
    ports    = ["22"]
  }
}
