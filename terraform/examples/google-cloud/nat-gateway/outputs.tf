output "static_ip_addresses" {
  description = "The gateways' egress address: allowlist it at your resources."
  value       = [google_compute_address.nat_ipv4.address]
}
